//! Domain primitives: ids, priorities, states and integer resource amounts.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// `alloc-` followed by 12 lowercase hex digits (48 random bits), as in the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(u64);

impl AllocationId {
    /// The largest id: ids are 48 bits.
    pub const MAX: u64 = (1 << 48) - 1;

    /// The id with these 48 bits.
    pub fn from_u64(v: u64) -> Self {
        debug_assert!(v <= Self::MAX);
        AllocationId(v & Self::MAX)
    }

    /// The id's 48 bits.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The id of the allocation decided by the event at `seq`: a keyed permutation of the 48-bit
    /// space (a 4-round Feistel network), so ids look random, as the original's did, and are
    /// unique by construction: no two sequence numbers give the same id, however long the
    /// history and whether or not old allocations are still in memory.
    pub fn for_seq(ledger_key: u64, seq: u64) -> Self {
        assert!(seq <= Self::MAX, "sequence number {seq} beyond 48 bits");
        let (mut left, mut right) = ((seq >> HALF_BITS) as u32, (seq & HALF_MASK) as u32);
        for round in 0..4u32 {
            let mixed = feistel_round(right, ledger_key, round);
            (left, right) = (right, left ^ mixed);
        }
        AllocationId((u64::from(left) << HALF_BITS) | u64::from(right))
    }

    /// The key for [`AllocationId::for_seq`], from the ledger's id (FNV-1a: stable across
    /// builds, unlike std's hasher).
    pub fn ledger_key(ledger_id: &str) -> u64 {
        ledger_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    }

    /// A random id (what builds before sequence-derived ids gave).
    pub fn random() -> Self {
        let bits = uuid::Uuid::new_v4().as_u128();
        AllocationId((bits as u64) & Self::MAX)
    }

    /// Parses an id given by a caller; the error names `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        text.parse().map_err(|()| {
            let shown: String = text.chars().take(SHOWN_CHARS).collect();
            Error::invalid(
                field,
                format!("{shown:?} is not an allocation id: expected `alloc-` followed by 12 lowercase hex digits, e.g. alloc-1a2b3c4d5e6f"),
            )
        })
    }
}

/// Bits in each half of the 48-bit id the Feistel network permutes.
const HALF_BITS: u32 = 24;
/// The low half's bits.
const HALF_MASK: u64 = (1 << HALF_BITS) - 1;

/// A 24-bit round function (splitmix64's finaliser over the half-block, key and round).
fn feistel_round(half: u32, key: u64, round: u32) -> u32 {
    let mut h =
        u64::from(half) ^ key.rotate_left(round * 16) ^ (u64::from(round) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((h ^ (h >> 31)) & HALF_MASK) as u32
}

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "alloc-{:012x}", self.0)
    }
}

impl AllocationId {
    /// Appends the id as [`fmt::Display`] writes it (`alloc-` and 12 hex digits), without the
    /// formatting machinery: every `granted` event writes one.
    pub(crate) fn put_text(self, out: &mut Vec<u8>) {
        debug_assert!(self.0 <= AllocationId::MAX, "ids have 12 hex digits");
        out.extend_from_slice(b"alloc-");
        out.extend((0..12).rev().map(|i| b"0123456789abcdef"[((self.0 >> (4 * i)) & 0xf) as usize]));
    }
}

impl FromStr for AllocationId {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let hex = s.strip_prefix("alloc-").ok_or(())?;
        if hex.len() != 12 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(());
        }
        u64::from_str_radix(hex, 16).map(AllocationId).map_err(|_| ())
    }
}

impl Serialize for AllocationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AllocationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(|()| serde::de::Error::custom(format!("invalid allocation id {s:?}")))
    }
}

/// How much of the pool a request may take: lower priorities leave a reserve free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Leaves the configured reserve (25% by default) free.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Above normal.
    High,
    /// The highest.
    Critical,
}

impl Priority {
    /// The accepted spellings, for error messages.
    pub const ALLOWED: &'static str = "low, normal, high, critical";

    /// The priority as JSON and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses a priority given by a caller; the error names `field` and lists the allowed values.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        match text {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "critical" => Ok(Priority::Critical),
            other => Err(Error::invalid(
                field,
                format!("{:?} is not a priority; allowed values: {}", truncate(other), Self::ALLOWED),
            )),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle of an allocation. Every state but `active` and `pending` is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationState {
    /// Holds its resources until released or past its deadline.
    Active,
    /// Released by its holder.
    Released,
    /// Its deadline passed.
    Expired,
    /// The request was valid but the pool could not hold it; it never held anything.
    Failed,
    /// The request waits in the queue (it asked to wait); nothing is held yet.
    Pending,
    /// The request was cancelled while it waited; it never held anything.
    Cancelled,
    /// A higher-priority request preempts it: it still holds its resources (so its job can
    /// checkpoint) until its `preempt_deadline`, or until it is released (`docs/policy.md` §2).
    Preempting,
    /// It was preempted by a higher-priority request: it held its resources until then.
    Preempted,
}

impl AllocationState {
    /// The accepted spellings, for error messages.
    pub const ALLOWED: &'static str = "active, released, expired, failed, pending, cancelled, preempting, preempted";

    /// The state as JSON and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            AllocationState::Active => "active",
            AllocationState::Released => "released",
            AllocationState::Expired => "expired",
            AllocationState::Failed => "failed",
            AllocationState::Pending => "pending",
            AllocationState::Cancelled => "cancelled",
            AllocationState::Preempting => "preempting",
            AllocationState::Preempted => "preempted",
        }
    }

    /// Whether the state is final (every state but `active`, `pending` and `preempting`).
    pub fn is_terminal(self) -> bool {
        !matches!(self, AllocationState::Active | AllocationState::Pending | AllocationState::Preempting)
    }

    /// Parses a state given by a caller; the error names `field` and lists the allowed values.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        match text {
            "active" => Ok(AllocationState::Active),
            "released" => Ok(AllocationState::Released),
            "expired" => Ok(AllocationState::Expired),
            "failed" => Ok(AllocationState::Failed),
            "pending" => Ok(AllocationState::Pending),
            "cancelled" => Ok(AllocationState::Cancelled),
            "preempting" => Ok(AllocationState::Preempting),
            "preempted" => Ok(AllocationState::Preempted),
            other => Err(Error::invalid(
                field,
                format!("{:?} is not a state; allowed values: {}", truncate(other), Self::ALLOWED),
            )),
        }
    }
}

impl fmt::Display for AllocationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of the pool, in integer units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU, in thousandths of a core.
    pub cpu_millicores: u64,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// Worker slots.
    pub workers: u32,
}

impl Resources {
    /// The sum, or `None` on overflow.
    pub fn checked_add(self, o: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millicores: self.cpu_millicores.checked_add(o.cpu_millicores)?,
            memory_mib: self.memory_mib.checked_add(o.memory_mib)?,
            workers: self.workers.checked_add(o.workers)?,
        })
    }

    /// The difference, or `None` if any part would go below zero.
    pub fn checked_sub(self, o: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millicores: self.cpu_millicores.checked_sub(o.cpu_millicores)?,
            memory_mib: self.memory_mib.checked_sub(o.memory_mib)?,
            workers: self.workers.checked_sub(o.workers)?,
        })
    }

    /// Whether every part is at most `o`'s.
    pub fn fits_within(self, o: Resources) -> bool {
        self.cpu_millicores <= o.cpu_millicores && self.memory_mib <= o.memory_mib && self.workers <= o.workers
    }
}

/// An allocation's free-form metadata, kept as the compact JSON text of an object (or nothing
/// for an empty one). Held as text because the ledger only stores and shows it: a parsed map
/// costs about 1 KiB and a dozen heap blocks per allocation, the text one block of its own size.
#[derive(Clone, Default)]
pub struct Metadata(Option<Box<serde_json::value::RawValue>>);

impl Metadata {
    /// The metadata of a JSON object (nothing for an empty one).
    #[allow(clippy::expect_used, reason = "a map of JSON values always serialises")]
    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> Metadata {
        if map.is_empty() {
            return Metadata(None);
        }
        Metadata(Some(serde_json::value::to_raw_value(map).expect("a JSON map serializes")))
    }

    /// From JSON text already known to be valid JSON (a logged event's); `None` unless it is an
    /// object.
    pub fn from_raw(raw: &serde_json::value::RawValue) -> Option<Metadata> {
        let text = raw.get();
        if !text.starts_with('{') {
            return None;
        }
        if text == "{}" {
            return Some(Metadata(None));
        }
        Some(Metadata(Some(raw.to_owned())))
    }

    /// From JSON text that must be an object (the snapshot's); the error says why not.
    pub fn from_json_text(text: String) -> std::result::Result<Metadata, String> {
        let raw = serde_json::value::RawValue::from_string(text).map_err(|e| format!("metadata: {e}"))?;
        Metadata::from_raw(&raw).ok_or_else(|| "metadata is not a JSON object".to_string())
    }

    /// Whether there is no metadata (an empty object).
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The compact JSON text, `{}` when empty.
    pub fn as_json(&self) -> &str {
        self.0.as_deref().map_or("{}", |r| r.get())
    }

    /// The metadata as a JSON object.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        match &self.0 {
            None => serde_json::Map::new(),
            // Only valid JSON objects get in, so this parse cannot fail.
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        self.0.as_ref()?;
        self.to_map().remove(key)
    }

    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |r| r.get().len())
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Metadata) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Eq for Metadata {}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for Metadata {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Metadata {
        Metadata::from_map(&map)
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(s),
            None => serde_json::Map::new().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Metadata {
    /// The general path (any deserializer, including serde's buffering for tagged enums): an
    /// object, turned back into compact text. The replay's lean path borrows the raw text
    /// instead (`Metadata::from_raw`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        Ok(Metadata::from_map(&map))
    }
}

/// CPU as the original showed it: cores as a float.
pub fn cores(millicores: u64) -> f64 {
    millicores as f64 / 1000.0
}

/// Most characters of a caller's text an error message repeats.
const SHOWN_CHARS: usize = 64;

/// `s` for an error message: at most [`SHOWN_CHARS`] characters, then `…`.
pub(crate) fn truncate(s: &str) -> String {
    if s.chars().count() <= SHOWN_CHARS {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(SHOWN_CHARS).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_id_round_trips_and_rejects_garbage() {
        let id = AllocationId::from_u64(0x1a2b3c4d5e6f);
        assert_eq!(id.to_string(), "alloc-1a2b3c4d5e6f");
        assert_eq!("alloc-1a2b3c4d5e6f".parse::<AllocationId>(), Ok(id));
        for bad in [
            "",
            "alloc-",
            "alloc-1A2B3C4D5E6F",
            "alloc-1a2b3c4d5e6",
            "x-1a2b3c4d5e6f",
            "alloc-1a2b3c4d5e6f0",
            "alloc-+a2b3c4d5e6f",
        ] {
            assert!(bad.parse::<AllocationId>().is_err(), "{bad}");
        }
        let err = AllocationId::parse("allocation_id", "nope").unwrap_err().to_string();
        assert!(err.contains("allocation_id") && err.contains("12 lowercase hex"), "{err}");
    }

    #[test]
    fn seq_derived_ids_are_unique() {
        let key = AllocationId::ledger_key("some-ledger");
        let ids: std::collections::HashSet<AllocationId> =
            (1..200_000).map(|s| AllocationId::for_seq(key, s)).collect();
        assert_eq!(ids.len(), 199_999);
        assert_ne!(AllocationId::for_seq(key, 1), AllocationId::for_seq(AllocationId::ledger_key("other"), 1));
        assert_eq!(AllocationId::for_seq(key, AllocationId::MAX).as_u64() >> 48, 0);
    }

    #[test]
    fn priority_errors_list_allowed_values() {
        let err = Priority::parse("priority", "urgent").unwrap_err().to_string();
        assert!(err.contains("priority") && err.contains("low, normal, high, critical"), "{err}");
        assert_eq!(Priority::parse("p", "critical").unwrap(), Priority::Critical);
    }
}
