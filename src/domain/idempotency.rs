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
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// Checks a key from outside: 1 to 128 bytes of printable characters (no control characters,
/// no leading or trailing space).
pub fn validate_idempotency_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; allowed: 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes", key.len()),
        ));
    }
    if key.chars().any(char::is_control) || key.trim() != key {
        return Err(Error::invalid(
            field,
            "must be printable: no control characters and no leading or trailing whitespace (e.g. a UUID)",
        ));
    }
    Ok(())
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    ts_us: Micros,
    seq: u64,
    allocation_id: AllocationId,
    rejected: Option<RejectReason>,
    fingerprint: u64,
}

/// The keys decided within the window, oldest first. About 130 bytes a key plus its length
/// (docs/benchmarks.md measures it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyTable {
    by_key: HashMap<Arc<str>, Entry>,
    /// In log order, so the oldest leave first; a key decided again after leaving the window
    /// is in here twice, and only the entry with its current timestamp removes it.
    by_age: VecDeque<(Micros, Arc<str>)>,
}

impl KeyTable {
    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Heap bytes the table holds: both indexes at their capacity (a hash table slot also has
    /// a control byte) and each key's shared string (two counters and the bytes, rounded up
    /// to 8 as allocators do).
    pub fn heap_bytes(&self) -> usize {
        let map = self.by_key.capacity() * (size_of::<(Arc<str>, Entry)>() + 1);
        let queue = self.by_age.capacity() * size_of::<(Micros, Arc<str>)>();
        let keys: usize = self.by_key.keys().map(|k| (2 * size_of::<usize>() + k.len()).next_multiple_of(8)).sum();
        map + queue + keys
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The record of `key` if it was decided within `window_seconds` before `now`.
    pub fn get(&self, key: &str, now: Micros, window_seconds: u64) -> Option<KeyRecord> {
        let (shared, e) = self.by_key.get_key_value(key)?;
        (!outside_window(e.ts_us, now, window_seconds)).then(|| KeyRecord {
            key: shared.clone(),
            ts_us: e.ts_us,
            seq: e.seq,
            allocation_id: e.allocation_id,
            rejected: e.rejected,
            fingerprint: e.fingerprint,
        })
    }

    /// Records a key's deciding event (a later one replaces an older entry of the same key,
    /// which only happens once the older one left the window).
    pub fn insert(&mut self, r: KeyRecord) {
        let key = r.key;
        let entry = Entry {
            ts_us: r.ts_us,
            seq: r.seq,
            allocation_id: r.allocation_id,
            rejected: r.rejected,
            fingerprint: r.fingerprint,
        };
        debug_assert!(self.by_age.back().is_none_or(|(t, _)| *t <= r.ts_us), "keys arrive in log order");
        self.by_age.push_back((r.ts_us, key.clone()));
        self.by_key.insert(key, entry);
    }

    /// Forgets the keys decided more than `window_seconds` before `now`.
    pub fn forget_older(&mut self, now: Micros, window_seconds: u64) {
        while let Some((ts_us, _)) = self.by_age.front() {
            if !outside_window(*ts_us, now, window_seconds) {
                break;
            }
            let Some((ts_us, key)) = self.by_age.pop_front() else { break };
            if self.by_key.get(&key).is_some_and(|e| e.ts_us == ts_us) {
                self.by_key.remove(&key);
            }
        }
    }

    /// Every remembered key, oldest first (for snapshots).
    pub fn records(&self) -> Vec<KeyRecord> {
        if self.is_empty() {
            return Vec::new();
        }
        self.by_age
            .iter()
            .filter_map(|(ts_us, key)| {
                let e = self.by_key.get(key).filter(|e| e.ts_us == *ts_us)?;
                Some(KeyRecord {
                    key: key.clone(),
                    ts_us: e.ts_us,
                    seq: e.seq,
                    allocation_id: e.allocation_id,
                    rejected: e.rejected,
                    fingerprint: e.fingerprint,
                })
            })
            .collect()
    }

    /// The table of `records` (oldest first, as [`KeyTable::records`] gives them).
    pub fn from_records(records: Vec<KeyRecord>) -> std::result::Result<KeyTable, String> {
        let mut t = KeyTable::default();
        for r in records {
            if t.by_age.back().is_some_and(|(ts, _)| *ts > r.ts_us) {
                return Err(format!("idempotency key {:?} is out of order", r.key));
            }
            if t.by_key.contains_key(&*r.key) {
                return Err(format!("idempotency key {:?} appears twice", r.key));
            }
            t.insert(r);
        }
        Ok(t)
    }
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
    fn bad_keys_name_the_field() {
        for bad in ["", " a", "a\n", &"k".repeat(129)] {
            let e = validate_idempotency_key("idempotency_key", bad).unwrap_err();
            assert!(e.to_string().contains("idempotency_key"), "{e}");
        }
        validate_idempotency_key("idempotency_key", "3f2a-9 retry/1").unwrap();
    }
}
