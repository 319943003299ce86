//! Retry-safe requests: the table of idempotency keys the fold keeps for the config's window.
//!
//! A key is recorded by the `granted` or `rejected` event that carries it, with a fingerprint of
//! the request as decided (job, workers, MCP servers, priority, lifetime, metadata, lifetime
//! bound). The same key with the same fingerprint is answered with the original outcome and
//! writes nothing; with another fingerprint it is invalid input (Stripe's and Nomad's rule).
//! Entries leave the table once older than `idempotency_window_seconds`, in the fold, so the
//! table is the same after replay, after a snapshot and live.

use crate::domain::clock::{Micros, MICROS_PER_SECOND};
use crate::domain::event::{Grant, RejectReason, Rejection};
use crate::domain::model::{AllocationId, Metadata, Priority};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// Checks a key from outside: 1 to 128 bytes of printable characters (no control characters,
/// no leading or trailing space).
pub fn validate_idempotency_key(field: &str, key: &str) -> Result<()> {
    if is_plain_ascii_key(key.as_bytes()) {
        return Ok(());
    }
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; allowed: 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes", key.len()),
        ));
    }
    if has_control_character(key) || key.starts_with(char::is_whitespace) || key.ends_with(char::is_whitespace) {
        return Err(Error::invalid(
            field,
            "must be printable: no control characters and no leading or trailing whitespace (e.g. a UUID)",
        ));
    }
    Ok(())
}

/// The usual key (a UUID, a job name and an attempt): 1 to 128 bytes of printable ASCII, not
/// starting or ending with a space (ASCII's only printable whitespace). Checked without an early
/// exit, so that it vectorises: it runs twice per keyed request under the state lock.
fn is_plain_ascii_key(b: &[u8]) -> bool {
    let printable = b.iter().fold(true, |ok, &c| ok & (c.wrapping_sub(0x20) < 0x5f));
    printable && (1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&b.len()) && b[0] != b' ' && b[b.len() - 1] != b' '
}

/// Whether `s` holds a control character (Unicode `Cc`: U+0000..=U+001F, U+007F..=U+009F), by
/// bytes: a key is checked once per keyed request, under the state lock, and decoding chars was
/// a visible part of it. In UTF-8 the C1 controls are 0xC2 followed by 0x80..=0x9F.
fn has_control_character(s: &str) -> bool {
    let b = s.as_bytes();
    // Printable ASCII, the usual key (a UUID), in one vectorised pass.
    if b.iter().all(|c| (0x20..0x7f).contains(c)) {
        return false;
    }
    b.iter()
        .enumerate()
        .any(|(i, &c)| c < 0x20 || c == 0x7f || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n))))
}

/// What identifies a request for the key rule, as decided (the lifetime resolved).
#[derive(Debug, Clone, Copy)]
pub struct RequestShape<'a> {
    /// The job.
    pub job_id: &'a str,
    /// Workers asked for.
    pub workers: u32,
    /// MCP servers, in the request's order.
    pub mcp_servers: &'a [&'a str],
    /// Priority.
    pub priority: Priority,
    /// The lifetime granted (or asked for).
    pub ttl_seconds: u64,
    /// The metadata as stored.
    pub metadata: &'a Metadata,
    /// The lifetime bound, if any.
    pub max_lifetime_seconds: Option<u64>,
    /// The tenant, if any.
    pub tenant: Option<&'a str>,
}

impl RequestShape<'_> {
    /// The request's fingerprint (see [`fingerprint_of`]).
    pub fn fingerprint(&self) -> u64 {
        fingerprint_of(self, self.mcp_servers.iter().copied())
    }
}

/// A 64-bit FNV-1a hash, word by word, of the fields of `shape` (its MCP server names from
/// `names`), each length-prefixed: stable across builds and platforms (recomputed from events
/// on every open; `docs/format.md` defines it and a test pins it).
fn fingerprint_of<'n>(shape: &RequestShape<'_>, names: impl ExactSizeIterator<Item = &'n str>) -> u64 {
    let mut h = Fnv::new();
    h.field(shape.job_id.as_bytes());
    h.word(u64::from(shape.workers));
    h.word(names.len() as u64);
    for name in names {
        h.field(name.as_bytes());
    }
    h.field(shape.priority.as_str().as_bytes());
    h.word(shape.ttl_seconds);
    h.field(shape.metadata.as_json().as_bytes());
    match shape.max_lifetime_seconds {
        None => h.word(u64::MAX),
        Some(s) => {
            h.word(0);
            h.word(s);
        }
    }
    match shape.tenant {
        None => h.word(u64::MAX),
        Some(t) => {
            h.word(0);
            h.field(t.as_bytes());
        }
    }
    h.0
}

/// FNV-1a, 64 bits, over little-endian 8-byte words (a byte at a time was a fifth of a keyed
/// grant's cost).
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Fnv {
        Fnv(Self::OFFSET)
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(Self::PRIME);
    }

    /// Length first, so that ("ab", "c") and ("a", "bc") differ; then 8-byte words, the last
    /// one zero-padded.
    fn field(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
    }
}

/// The fingerprint of a grant's request.
pub fn grant_fingerprint(g: &Grant) -> u64 {
    let shape = RequestShape {
        job_id: &g.job_id,
        workers: g.resources.workers,
        mcp_servers: &[],
        priority: g.priority,
        ttl_seconds: g.ttl_seconds,
        metadata: &g.metadata,
        max_lifetime_seconds: g.max_lifetime_seconds,
        tenant: g.tenant.as_deref(),
    };
    fingerprint_of(&shape, g.mcp_servers.iter().map(|m| m.name.as_str()))
}

/// The fingerprint of a rejection's request.
pub fn rejection_fingerprint(r: &Rejection) -> u64 {
    let shape = RequestShape {
        job_id: &r.job_id,
        workers: r.workers,
        mcp_servers: &[],
        priority: r.priority,
        ttl_seconds: r.ttl_seconds,
        metadata: &r.metadata,
        max_lifetime_seconds: r.max_lifetime_seconds,
        tenant: r.tenant.as_deref(),
    };
    fingerprint_of(&shape, r.mcp_servers.iter().map(String::as_str))
}

/// The fingerprint of a waiting request (the same as its grant's will be).
pub fn queued_fingerprint(q: &crate::domain::queue::Queued) -> u64 {
    let shape = RequestShape {
        job_id: &q.job_id,
        workers: q.workers,
        mcp_servers: &[],
        priority: q.priority,
        ttl_seconds: q.ttl_seconds,
        metadata: &q.metadata,
        max_lifetime_seconds: q.max_lifetime_seconds,
        tenant: q.tenant.as_deref(),
    };
    fingerprint_of(&shape, q.mcp_servers.iter().map(String::as_str))
}

/// One remembered key: which event decided it, and what it was asked with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key (shared with the table, so a snapshot copies pointers, not strings).
    pub key: Arc<str>,
    /// When the deciding event was recorded.
    pub ts_us: Micros,
    /// Its sequence number.
    pub seq: u64,
    /// The allocation it created (granted or failed).
    pub allocation_id: AllocationId,
    /// Why it was rejected; `None`: it was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<RejectReason>,
    /// The request's fingerprint (64-bit FNV-1a of its fields as decided; see `docs/format.md`).
    pub fingerprint: u64,
}

impl KeyRecord {
    /// The record, borrowed.
    pub fn view(&self) -> KeyView<'_> {
        KeyView {
            key: &self.key,
            ts_us: self.ts_us,
            seq: self.seq,
            allocation_id: self.allocation_id,
            rejected: self.rejected,
            fingerprint: self.fingerprint,
        }
    }
}

/// A remembered key, borrowed from the table or a [`KeyRecord`]: what a snapshot encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyView<'a> {
    /// The key.
    pub key: &'a str,
    /// When the deciding event was recorded.
    pub ts_us: Micros,
    /// Its sequence number.
    pub seq: u64,
    /// The allocation it created (granted or failed).
    pub allocation_id: AllocationId,
    /// Why it was rejected; `None`: it was granted.
    pub rejected: Option<RejectReason>,
    /// The request's fingerprint.
    pub fingerprint: u64,
}

/// One decided key, in the age queue.
#[derive(Debug, Clone)]
struct Slot {
    key: Arc<str>,
    /// The key's hash in the table's index (kept, so that growing the index and forgetting
    /// the key never read the key's bytes again).
    hash: u64,
    ts_us: Micros,
    seq: u64,
    allocation_id: AllocationId,
    rejected: Option<RejectReason>,
    fingerprint: u64,
    /// False once the key was decided again (after this entry left the window): the newer
    /// slot answers for it, and this one only waits to leave the queue.
    current: bool,
}

impl Slot {
    fn record(&self) -> KeyRecord {
        KeyRecord {
            key: self.key.clone(),
            ts_us: self.ts_us,
            seq: self.seq,
            allocation_id: self.allocation_id,
            rejected: self.rejected,
            fingerprint: self.fingerprint,
        }
    }

    fn view(&self) -> KeyView<'_> {
        KeyView {
            key: &self.key,
            ts_us: self.ts_us,
            seq: self.seq,
            allocation_id: self.allocation_id,
            rejected: self.rejected,
            fingerprint: self.fingerprint,
        }
    }
}

/// An index entry: a key's hash and the absolute position of its current slot.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    hash: u64,
    position: u64,
}

/// Slots per chunk of the age queue: 64 KiB of slots, so that a snapshot shares the queue by
/// copying one pointer per 1024 keys, and a write after it copies at most one chunk.
const CHUNK_SLOTS: usize = 1024;

/// The age queue: slots in log order, in chunks of [`CHUNK_SLOTS`] shared by reference
/// counting. Every chunk but the last is full; the oldest `front` slots of the first chunk have
/// left the window already.
#[derive(Debug, Clone, Default)]
struct AgeQueue {
    chunks: VecDeque<Arc<Vec<Slot>>>,
    front: usize,
    len: usize,
}

impl AgeQueue {
    fn get(&self, index: usize) -> Option<&Slot> {
        if index >= self.len {
            return None;
        }
        let at = self.front + index;
        self.chunks.get(at / CHUNK_SLOTS)?.get(at % CHUNK_SLOTS)
    }

    /// The slot at `index`, copying its chunk first if a snapshot still shares it.
    fn get_mut(&mut self, index: usize) -> Option<&mut Slot> {
        if index >= self.len {
            return None;
        }
        let at = self.front + index;
        Arc::make_mut(self.chunks.get_mut(at / CHUNK_SLOTS)?).get_mut(at % CHUNK_SLOTS)
    }

    fn front(&self) -> Option<&Slot> {
        self.get(0)
    }

    fn back(&self) -> Option<&Slot> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    fn push_back(&mut self, slot: Slot) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK_SLOTS => Arc::make_mut(last).push(slot),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK_SLOTS);
                chunk.push(slot);
                self.chunks.push_back(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Drops the oldest slot (its chunk, once all of its slots have left): its hash and
    /// whether it was current.
    fn pop_front(&mut self) -> Option<(u64, bool)> {
        let slot = self.front().map(|s| (s.hash, s.current))?;
        self.front += 1;
        self.len -= 1;
        if self.front == CHUNK_SLOTS || self.len == 0 {
            self.chunks.pop_front();
            self.front = 0;
        }
        debug_assert_eq!(self.len == 0, self.chunks.is_empty());
        Some(slot)
    }

    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.chunks.iter().flat_map(|c| c.iter()).skip(self.front)
    }

    fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * size_of::<Arc<Vec<Slot>>>()
            + self.chunks.iter().map(|c| c.capacity() * size_of::<Slot>() + 2 * size_of::<usize>()).sum::<usize>()
    }
}

/// The idempotency keys as a snapshot takes them under the ledger's lock: the age queue
/// shared chunk by chunk, read into records later, outside the lock.
#[derive(Debug, Clone)]
pub struct SharedKeys(AgeQueue);

impl SharedKeys {
    /// Every remembered key, oldest first.
    pub fn records(&self) -> Vec<KeyRecord> {
        let mut out = Vec::with_capacity(self.0.len);
        out.extend(self.0.iter().filter(|s| s.current).map(Slot::record));
        out
    }

    /// Every remembered key, oldest first, borrowed: a snapshot encodes them from here without
    /// copying a record or touching a key's reference count.
    pub fn views(&self) -> impl Iterator<Item = KeyView<'_>> {
        self.0.iter().filter(|s| s.current).map(Slot::view)
    }

    /// The same keys chunk by chunk, oldest first (see [`KeyChunk`]): a snapshot reuses the
    /// encoding of a chunk the last one encoded.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = KeyChunk<'_>> {
        let front = self.0.front;
        self.0.chunks.iter().enumerate().map(move |(i, chunk)| KeyChunk { chunk, skip: if i == 0 { front } else { 0 } })
    }
}

/// One chunk of the shared key queue. A *whole* chunk (full, none of its slots left the
/// window) never changes while something keeps it: the table marks a superseded slot only
/// after copying a chunk that is shared (`Arc::make_mut`), and never adds to a full one. So a
/// [`ChunkHandle`] kept from one snapshot names the same keys at the next, and their encoding
/// can be reused.
pub(crate) struct KeyChunk<'a> {
    chunk: &'a Arc<Vec<Slot>>,
    skip: usize,
}

impl<'a> KeyChunk<'a> {
    /// The chunk's remembered keys, oldest first.
    pub(crate) fn views(&self) -> impl Iterator<Item = KeyView<'a>> + 'a {
        let slots: &'a [Slot] = self.chunk;
        slots[self.skip..].iter().filter(|s| s.current).map(Slot::view)
    }

    /// Whether the chunk is full and none of its slots left the window.
    pub(crate) fn is_whole(&self) -> bool {
        self.skip == 0 && self.chunk.len() == CHUNK_SLOTS
    }

    /// A handle that keeps the chunk (and so its contents) as they are now.
    pub(crate) fn handle(&self) -> ChunkHandle {
        ChunkHandle(self.chunk.clone())
    }

    /// Whether `handle` was taken from this very chunk, unchanged since.
    pub(crate) fn is(&self, handle: &ChunkHandle) -> bool {
        Arc::ptr_eq(self.chunk, &handle.0)
    }
}

/// A chunk of the key queue kept by a snapshot's encoding cache (see [`KeyChunk`]).
#[derive(Clone)]
pub(crate) struct ChunkHandle(Arc<Vec<Slot>>);

impl std::fmt::Debug for ChunkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkHandle({} slots)", self.0.len())
    }
}

/// The keys decided within the window, oldest first: the entries live in a queue in log order
/// (so a snapshot shares them chunk by chunk, and copies them with one linear pass, no
/// hashing, outside the ledger's lock) and a hash index maps each key to its entry's position.
/// The index holds only hashes and positions, not the keys: a keyed grant (under the state
/// lock) adds one index entry of 16 bytes and touches no reference count, and the index grows
/// without reading a key. About 150 bytes a key plus its length (docs/benchmarks.md measures
/// it).
#[derive(Clone, Default)]
pub struct KeyTable {
    /// Current slots by key. foldhash, seeded per process: keys come from outside, and SipHash
    /// was a tenth of a keyed grant's cost under the state lock.
    by_key: hashbrown::HashTable<Indexed>,
    hasher: foldhash::quality::RandomState,
    /// In log order, so the oldest leave first.
    by_age: AgeQueue,
    /// The absolute position of `by_age`'s first slot.
    first_position: u64,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable").field("keys", &self.len()).field("queued", &self.by_age.len).finish()
    }
}

impl PartialEq for KeyTable {
    /// The same keys with the same records: how the queue got there (superseded slots still
    /// waiting to leave, the positions) does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.records() == other.records()
    }
}

impl Eq for KeyTable {}

impl KeyTable {
    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Heap bytes the table holds: the index at its capacity (a hash table slot also has a
    /// control byte), the age queue's chunks and each key's shared string (two counters and
    /// the bytes, rounded up to 8 as allocators do).
    pub fn heap_bytes(&self) -> usize {
        let index = self.by_key.capacity() * (size_of::<Indexed>() + 1);
        let keys: usize = self
            .by_age
            .iter()
            .filter(|s| s.current)
            .map(|s| (2 * size_of::<usize>() + s.key.len()).next_multiple_of(8))
            .sum();
        index + self.by_age.heap_bytes() + keys
    }

    fn hash_of(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    /// The index in `by_age` of absolute position `position` (past the end if it left).
    fn index_of(first_position: u64, position: u64) -> usize {
        usize::try_from(position.wrapping_sub(first_position)).unwrap_or(usize::MAX)
    }

    /// The current slot of `key`.
    fn slot(&self, key: &str) -> Option<&Slot> {
        let hash = self.hash_of(key);
        let (by_age, first) = (&self.by_age, self.first_position);
        let found = self.by_key.find(hash, |e| names_key(by_age, first, e, hash, key))?;
        let slot = by_age.get(Self::index_of(first, found.position));
        debug_assert!(slot.is_some_and(|s| s.current), "the index points at the key's current slot");
        slot
    }

    /// The record of `key` if it was decided within `window_seconds` before `now`.
    pub fn get(&self, key: &str, now: Micros, window_seconds: u64) -> Option<KeyRecord> {
        let slot = self.slot(key)?;
        (!outside_window(slot.ts_us, now, window_seconds)).then(|| slot.record())
    }

    /// Records a key's deciding event (a later one replaces an older entry of the same key,
    /// which only happens once the older one left the window).
    pub fn insert(&mut self, r: KeyRecord) {
        debug_assert!(self.by_age.back().is_none_or(|s| s.ts_us <= r.ts_us), "keys arrive in log order");
        let position = self.first_position + self.by_age.len as u64;
        let hash = self.hash_of(&r.key);
        let first = self.first_position;
        let by_age = &mut self.by_age;
        match self.by_key.find_mut(hash, |e| names_key(by_age, first, e, hash, &r.key)) {
            Some(e) => {
                let old = Self::index_of(first, e.position);
                e.position = position;
                if let Some(slot) = by_age.get_mut(old) {
                    slot.current = false;
                }
            }
            None => {
                self.by_key.insert_unique(hash, Indexed { hash, position }, |e| e.hash);
            }
        }
        by_age.push_back(Slot {
            key: r.key,
            hash,
            ts_us: r.ts_us,
            seq: r.seq,
            allocation_id: r.allocation_id,
            rejected: r.rejected,
            fingerprint: r.fingerprint,
            current: true,
        });
    }

    /// Forgets the keys decided more than `window_seconds` before `now`.
    pub fn forget_older(&mut self, now: Micros, window_seconds: u64) {
        while self.by_age.front().is_some_and(|s| outside_window(s.ts_us, now, window_seconds)) {
            let Some((hash, current)) = self.by_age.pop_front() else { break };
            let position = self.first_position;
            self.first_position += 1;
            if current {
                // The entry naming this very position: no key comparison needed.
                match self.by_key.find_entry(hash, |e| e.position == position) {
                    Ok(entry) => {
                        entry.remove();
                    }
                    Err(_) => debug_assert!(false, "a current slot has its index entry"),
                }
            }
        }
    }

    /// Every remembered key, oldest first (for snapshots): one pass over the queue.
    pub fn records(&self) -> Vec<KeyRecord> {
        let out = self.shared().records();
        debug_assert_eq!(out.len(), self.len());
        out
    }

    /// The keys shared for a snapshot: a pointer per chunk (see [`SharedKeys::records`]).
    pub fn shared(&self) -> SharedKeys {
        SharedKeys(self.by_age.clone())
    }

    /// The table of `records` (oldest first, as [`KeyTable::records`] gives them).
    pub fn from_records(records: Vec<KeyRecord>) -> std::result::Result<KeyTable, String> {
        let mut t = KeyTable::default();
        t.by_key.reserve(records.len(), |e| e.hash);
        for r in records {
            if t.by_age.back().is_some_and(|s| s.ts_us > r.ts_us) {
                return Err(format!("idempotency key {:?} is out of order", r.key));
            }
            if t.slot(&r.key).is_some() {
                return Err(format!("idempotency key {:?} appears twice", r.key));
            }
            t.insert(r);
        }
        Ok(t)
    }
}

/// Whether index entry `e` is `key`'s (its hash is `hash`), the age queue starting at
/// absolute position `first`: the hashes first, the key's bytes only when they agree.
fn names_key(by_age: &AgeQueue, first: u64, e: &Indexed, hash: u64, key: &str) -> bool {
    e.hash == hash && by_age.get(KeyTable::index_of(first, e.position)).is_some_and(|s| *s.key == *key)
}

/// Whether an entry recorded at `ts_us` is older than the window at `now`.
fn outside_window(ts_us: Micros, now: Micros, window_seconds: u64) -> bool {
    let window_us =
        i64::try_from(window_seconds).unwrap_or(i64::MAX / MICROS_PER_SECOND).saturating_mul(MICROS_PER_SECOND);
    now.saturating_since(ts_us) > window_us
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, ts: i64, seq: u64) -> KeyRecord {
        KeyRecord {
            key: Arc::from(key),
            ts_us: Micros::from_micros(ts),
            seq,
            allocation_id: AllocationId::from_u64(seq),
            rejected: None,
            fingerprint: seq,
        }
    }

    #[test]
    fn keys_leave_after_the_window_and_a_reused_key_survives_its_old_entry() {
        let mut t = KeyTable::default();
        t.insert(record("a", 0, 1));
        t.insert(record("b", 5_000_000, 2));
        assert!(t.get("a", Micros::from_micros(10_000_000), 10).is_some());
        assert!(t.get("a", Micros::from_micros(10_000_001), 10).is_none(), "outside the window");
        t.forget_older(Micros::from_micros(10_000_001), 10);
        assert_eq!(t.len(), 1);
        // "b" decided again after leaving the window: the old age entry must not remove it.
        t.insert(record("b", 16_000_000, 3));
        t.forget_older(Micros::from_micros(16_000_000), 10);
        assert_eq!(t.get("b", Micros::from_micros(16_000_000), 10).map(|r| r.seq), Some(3));
        let again = KeyTable::from_records(t.records()).unwrap();
        assert_eq!(again.records(), t.records());
    }

    const PINNED_FINGERPRINT: u64 = 0xb34f_1d10_3cd5_4b07;

    #[test]
    fn fingerprints_tell_fields_apart() {
        let m = Metadata::default();
        let base = RequestShape {
            job_id: "ab",
            workers: 1,
            mcp_servers: &["c"],
            priority: Priority::Normal,
            ttl_seconds: 60,
            metadata: &m,
            max_lifetime_seconds: None,
            tenant: None,
        };
        let f = base.fingerprint();
        assert_eq!(f, base.fingerprint(), "stable");
        assert_ne!(f, RequestShape { job_id: "a", mcp_servers: &["bc"], ..base }.fingerprint());
        assert_ne!(f, RequestShape { workers: 2, ..base }.fingerprint());
        assert_ne!(f, RequestShape { ttl_seconds: 61, ..base }.fingerprint());
        assert_ne!(f, RequestShape { max_lifetime_seconds: Some(0), ..base }.fingerprint());
        assert_ne!(f, RequestShape { priority: Priority::High, ..base }.fingerprint());
        assert_ne!(f, RequestShape { tenant: Some(""), ..base }.fingerprint());
        // Pinned: the fingerprint is recomputed from events on every open, so it must not change.
        assert_eq!(f, PINNED_FINGERPRINT, "{f:#x}");
    }

    #[test]
    fn the_byte_check_for_control_characters_is_char_is_control() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            for s in [c.to_string(), format!("a{c}b"), format!("{c}\u{85}")] {
                assert_eq!(has_control_character(&s), s.chars().any(char::is_control), "{c:?} in {s:?}");
            }
        }
        assert!(!has_control_character("é\u{a0}ĉ"), "0xC2 followed by a byte past 0x9F is not a control");
    }

    #[test]
    fn records_skip_superseded_slots_and_tables_compare_by_content() {
        let mut t = KeyTable::default();
        t.insert(record("a", 0, 1));
        t.insert(record("b", 1, 2));
        // "a" decided again once outside the window, before the fold forgot it.
        t.insert(record("a", 20_000_000, 3));
        assert_eq!(t.len(), 2);
        let seqs: Vec<u64> = t.records().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(t.get("a", Micros::from_micros(20_000_000), 10).map(|r| r.seq), Some(3));
        let reloaded = KeyTable::from_records(t.records()).unwrap();
        assert_eq!(reloaded, t, "the superseded slot still queued makes no difference");
        t.forget_older(Micros::from_micros(20_000_000), 10);
        assert_eq!(t.len(), 1, "b left; the stale slot of a left without removing the current a");
        assert_eq!(t.get("a", Micros::from_micros(20_000_000), 10).map(|r| r.seq), Some(3));
        assert_ne!(reloaded, t);
    }

    /// Across chunk boundaries, with a snapshot sharing the chunks while the table goes on:
    /// the shared copy keeps what it saw, the table what it has now.
    #[test]
    fn a_shared_copy_is_unchanged_by_later_inserts_and_forgets() {
        let mut t = KeyTable::default();
        let n = 3 * CHUNK_SLOTS as u64 + 17;
        for i in 0..n {
            t.insert(record(&format!("k{i}"), i as i64 * 1_000_000, i + 1));
        }
        let shared = t.shared();
        let before = t.records();
        // Forget the first chunk and a half, supersede a key in a shared chunk, add more.
        t.forget_older(Micros::from_micros((CHUNK_SLOTS as i64 * 3 / 2 + 10) * 1_000_000), 10);
        t.insert(record("k2000", n as i64 * 1_000_000, n + 1));
        t.insert(record("new", n as i64 * 1_000_000, n + 2));
        assert_eq!(shared.records(), before, "the snapshot's copy did not change");
        let now = t.records();
        assert_eq!(now.len(), t.len());
        assert_eq!(now.first().map(|r| r.seq), Some(CHUNK_SLOTS as u64 * 3 / 2 + 1));
        assert_eq!(now.last().map(|r| &*r.key), Some("new"));
        assert_eq!(now.iter().filter(|r| &*r.key == "k2000").count(), 1, "k2000's old slot is superseded");
        let later = Micros::from_micros(n as i64 * 1_000_000);
        assert_eq!(t.get("k2000", later, 10_000).map(|r| r.seq), Some(n + 1));
        assert_eq!(KeyTable::from_records(now.clone()).unwrap().records(), now);
        // Everything leaves: the queue is empty and starts again cleanly.
        t.forget_older(Micros::from_micros(i64::MAX / 2), 10);
        assert_eq!((t.len(), t.records().len()), (0, 0));
        t.insert(record("again", i64::MAX / 2, n + 3));
        assert_eq!(t.get("again", Micros::from_micros(i64::MAX / 2), 10).map(|r| r.seq), Some(n + 3));
    }

    /// The ASCII fast path agrees with the full rule on every short ASCII string around its
    /// edges (spaces, DEL, controls, length bounds).
    #[test]
    fn the_ascii_fast_path_accepts_only_what_the_full_rule_accepts() {
        let full = |k: &str| {
            !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES
                && !k.chars().any(char::is_control)
                && !k.starts_with(char::is_whitespace)
                && !k.ends_with(char::is_whitespace)
        };
        let edge = [0u8, 0x1f, b' ', b'!', b'a', b'~', 0x7f];
        for a in edge {
            for b in edge {
                for c in edge {
                    for bytes in [vec![a], vec![a, b], vec![a, b, c]] {
                        let k = std::str::from_utf8(&bytes).unwrap();
                        if is_plain_ascii_key(k.as_bytes()) {
                            assert!(full(k), "{k:?} passed the fast path");
                        }
                        assert_eq!(validate_idempotency_key("k", k).is_ok(), full(k), "{k:?}");
                    }
                }
            }
        }
        assert!(is_plain_ascii_key("k".repeat(128).as_bytes()));
        assert!(!is_plain_ascii_key("k".repeat(129).as_bytes()));
        assert!(!is_plain_ascii_key(b""));
    }

    #[test]
    fn bad_keys_name_the_field() {
        for bad in ["", " a", "a\n", "a ", "a\u{85}b", "\u{3000}a", &"k".repeat(129)] {
            let e = validate_idempotency_key("idempotency_key", bad).unwrap_err();
            assert!(e.to_string().contains("idempotency_key"), "{e}");
        }
        validate_idempotency_key("idempotency_key", "3f2a-9 retry/1").unwrap();
    }
}
