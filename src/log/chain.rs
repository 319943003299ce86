//! The tamper-evident chain of the log (segment format version 4, `docs/format.md`, "The
//! chain"). Every record carries a chain value: BLAKE3 of the previous record's chain value,
//! the record's sequence number and payload length, and its payload. So the value of the last
//! record (the *head*) commits to every record before it back to where the chain begins, and a
//! record rewritten with a recomputed CRC no longer links to the one after it.
//!
//! The CRC still tells torn and damaged records apart cheaply; the chain is checked by `verify`
//! (and by replicas comparing heads), never on the replay's hot path: a record's own value is
//! stored with it, so a reader resumes anywhere from the stored value.

use std::fmt;
use std::str::FromStr;

/// Bytes of a chain value.
pub const CHAIN_BYTES: usize = 32;

/// A chain value: BLAKE3 output, shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainValue(pub [u8; CHAIN_BYTES]);

/// Where the chain begins: the value "before" the first chained record, all zeros. A new ledger's
/// chain begins before record 1; an older ledger's at its first version 4 segment (whose header
/// then holds this value).
pub const GENESIS: ChainValue = ChainValue([0; CHAIN_BYTES]);

impl ChainValue {
    /// The value's bytes.
    pub fn as_bytes(&self) -> &[u8; CHAIN_BYTES] {
        &self.0
    }

    /// The value as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ChainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainValue({self})")
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChainValue(pub String);

impl fmt::Display for BadChainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a chain value is 64 hex digits, got {:?}", self.0)
    }
}

impl std::error::Error for BadChainValue {}

impl FromStr for ChainValue {
    type Err = BadChainValue;

    fn from_str(s: &str) -> Result<ChainValue, BadChainValue> {
        let bad = || BadChainValue(s.to_string());
        if s.len() != 2 * CHAIN_BYTES || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; CHAIN_BYTES];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ChainValue(out))
    }
}

impl serde::Serialize for ChainValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChainValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChainValue, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The chain value of record `seq` with `payload`, after the record whose value is `prev`:
/// `BLAKE3(prev (32 bytes) || seq (u64 LE) || payload length (u32 LE) || payload)`. The
/// durable lag and the CRC are not in it: they say when and how a record was written, not what
/// it is, so two copies of one history (replicas) have the same chain.
#[inline]
pub fn chain_next(prev: &ChainValue, seq: u64, payload: &[u8]) -> ChainValue {
    let mut h = blake3::Hasher::new();
    h.update(&prev.0);
    h.update(&seq.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    ChainValue(*h.finalize().as_bytes())
}

/// The head of a chained log: its last record and that record's chain value. `seq` is 0 and
/// `hash` [`GENESIS`] before any record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    /// The last record's sequence number.
    pub seq: u64,
    /// Its chain value.
    pub hash: ChainValue,
}

impl fmt::Display for ChainHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl FromStr for ChainHead {
    type Err = String;

    /// `SEQ:HASH`, as `verify` prints a head and `--expect-head` takes it.
    fn from_str(s: &str) -> Result<ChainHead, String> {
        let (seq, hash) = s.split_once(':').ok_or_else(|| format!("expected SEQ:HASH, got {s:?}"))?;
        let seq = seq.trim().parse::<u64>().map_err(|e| format!("bad sequence number {seq:?}: {e}"))?;
        let hash = hash.trim().parse::<ChainValue>().map_err(|e| e.to_string())?;
        Ok(ChainHead { seq, hash })
    }
}

#[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
/// Why a copy of a replicated ledger stops: its chain value at `seq` (`here`) is not the one
/// the shared log carries (`there`), so its history is not the leader's.
pub(crate) fn diverged_reason(seq: u64, here: &ChainValue, there: &ChainValue) -> String {
    format!(
        "this copy diverged from the shared log at record {seq}: its chain value there is {here}, the \
         shared log's is {there}; it refuses to serve (no writes, no campaign). Move its data directory \
         aside and start it empty (it rebuilds from the shared log) or from a copy of a healthy peer's"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let v = chain_next(&GENESIS, 1, b"{}");
        let hex = v.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<ChainValue>(), Ok(v));
        assert_eq!(hex.to_uppercase().parse::<ChainValue>(), Ok(v), "either case parses");
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            assert!(bad.parse::<ChainValue>().is_err(), "{bad:?}");
        }
        let head = ChainHead { seq: 7, hash: v };
        assert_eq!(head.to_string().parse::<ChainHead>(), Ok(head));
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<ChainValue>(&format!("\"{hex}\"")).unwrap(), v);
    }

    /// The definition is part of the format: a pinned value.
    #[test]
    fn the_chain_function_is_pinned() {
        let mut input = vec![0u8; 32];
        input.extend(1u64.to_le_bytes());
        input.extend(2u32.to_le_bytes());
        input.extend(b"{}");
        assert_eq!(chain_next(&GENESIS, 1, b"{}"), ChainValue(*blake3::hash(&input).as_bytes()));
        assert_ne!(chain_next(&GENESIS, 2, b"{}"), chain_next(&GENESIS, 1, b"{}"), "the sequence number counts");
    }
}
