//! Record framing. A record is a 16-byte header followed by its payload:
//!
//! ```text
//! | len: u32 LE | seq: u64 LE | crc: u32 LE | payload: len bytes |
//! ```
//!
//! `crc` is CRC-32 (IEEE, `crc32fast`) over `len`, `seq` and the payload, so a damaged length or
//! sequence number is caught like damaged data.
//!
//! The top 11 bits of `len` are the *durable lag* (segment format version 3; 0 in older ones):
//! when the writer writes a record, it records how far behind that record's own sequence
//! number the log was known durable (every earlier record covered by an fsync that returned
//! success). A valid record with sequence number `s` and lag `l > 0` is proof that every record
//! up to `s - l` was durable before it was written, so damage there cannot be a torn write (see
//! [`crate::log::segment`]). A lag of 1 marks the first record of a write made when everything
//! before it was durable. 0 means unknown (a lag too large to hold). The checksum covers it.
//!
//! Segment format version 4 *chains* its records ([`Framing::Chained`]): the 32-byte chain
//! value of the record (`log/chain.rs`) follows the header, before the payload, and the
//! checksum covers it too:
//!
//! ```text
//! | len: u32 LE | seq: u64 LE | crc: u32 LE | chain: 32 bytes | payload: len bytes |
//! ```
//!
//! The writer frames a record with a zero chain value under the ledger's lock and stamps the
//! value (with the durable lag and the checksum) when the flush writes it ([`stamp_chained`]),
//! outside that lock.

use crate::log::chain::{self, ChainValue, CHAIN_BYTES};
use crate::log::fields::{self, ShortInput};

/// The header in front of every record's payload (`docs/format.md`, "Record framing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The length field as stored: the payload length in its low bits, the durable lag in the
    /// top ones (see [`payload_len`] and [`durable_lag`]).
    pub len_field: u32,
    /// The record's sequence number: 1 for the ledger's first record, +1 for each.
    pub seq: u64,
    /// CRC-32 over the length field and sequence number as stored, then the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// Where the length field sits.
    pub const LEN_FIELD_OFFSET: usize = 0;
    /// Where the sequence number sits.
    pub const SEQ_OFFSET: usize = Self::LEN_FIELD_OFFSET + size_of::<u32>();
    /// Where the checksum sits; it covers the bytes before it.
    pub const CRC_OFFSET: usize = Self::SEQ_OFFSET + size_of::<u64>();
    /// Bytes of the header; the payload follows.
    pub const LEN: usize = Self::CRC_OFFSET + size_of::<u32>();

    /// The header at the start of `bytes`, unchecked (the checksum needs the payload).
    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Self, ShortInput> {
        fields::prefix::<{ Self::LEN }>(bytes).map(Self::from_array)
    }

    #[inline]
    fn from_array(raw: &[u8; Self::LEN]) -> Self {
        RecordHeader {
            len_field: fields::u32_at(raw, Self::LEN_FIELD_OFFSET),
            seq: fields::u64_at(raw, Self::SEQ_OFFSET),
            crc: fields::u32_at(raw, Self::CRC_OFFSET),
        }
    }

    /// The header's bytes.
    #[inline]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut raw = [0; Self::LEN];
        fields::put(&mut raw, Self::LEN_FIELD_OFFSET, self.len_field.to_le_bytes());
        fields::put(&mut raw, Self::SEQ_OFFSET, self.seq.to_le_bytes());
        fields::put(&mut raw, Self::CRC_OFFSET, self.crc.to_le_bytes());
        raw
    }

    /// The payload length the length field holds.
    #[inline]
    pub fn payload_len(&self) -> usize {
        payload_len(self.len_field)
    }

    #[cfg(any(test, feature = "test-util"))]
    /// The checksum a record with this length field and sequence number and `payload` has.
    #[inline]
    pub fn checksum_of(&self, payload: &[u8]) -> u32 {
        checksum(self.len_field, self.seq, payload)
    }
}

/// Bytes of a record header (`RecordHeader::LEN`).
pub const HEADER_LEN: usize = RecordHeader::LEN;
const _: () = assert!(HEADER_LEN == 16, "docs/format.md: a record header is 16 bytes");
const _: () = assert!(RecordHeader::CRC_OFFSET == 12, "the checksum follows len and seq");

/// How the records of a segment are framed: the segment's format version says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Versions 1 to 3: the header, then the payload.
    Plain,
    /// Version 4: the header, the record's chain value, then the payload.
    Chained,
}

impl Framing {
    /// Bytes in front of a payload.
    #[inline]
    pub const fn overhead(self) -> usize {
        match self {
            Framing::Plain => HEADER_LEN,
            Framing::Chained => CHAINED_OVERHEAD,
        }
    }
}

/// Bytes in front of a chained record's payload: the header and the chain value.
pub const CHAINED_OVERHEAD: usize = HEADER_LEN + CHAIN_BYTES;
const _: () = assert!(CHAINED_OVERHEAD == 48, "docs/format.md: a chained record's payload starts at 48");

/// Upper bound on a payload; a length above it is damage, never a torn write.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// The low bits of the length field that hold the payload length (`MAX_PAYLOAD_LEN` needs 21).
const LEN_BITS: u32 = 21;
const LEN_MASK: u32 = (1 << LEN_BITS) - 1;
/// The largest durable lag the length field holds; a larger one is written as 0 (unknown).
pub const MAX_DURABLE_LAG: u64 = (1 << (u32::BITS - LEN_BITS)) - 1;
const _: () = assert!(MAX_PAYLOAD_LEN as u64 <= LEN_MASK as u64, "the length bits hold every payload length");

/// The payload length a length field holds (the durable lag masked off).
#[inline]
pub fn payload_len(len_field: u32) -> usize {
    (len_field & LEN_MASK) as usize
}

/// The durable lag a length field holds (0: none recorded).
#[inline]
pub fn durable_lag(len_field: u32) -> u64 {
    u64::from(len_field >> LEN_BITS)
}

/// The length field of a record of `payload_len` bytes written `lag` records after the last
/// one known durable; a lag the field cannot hold is written as 0 (unknown).
#[inline]
fn len_field(payload_len: usize, lag: u64) -> u32 {
    debug_assert!(payload_len <= MAX_PAYLOAD_LEN);
    let lag_bits = match u32::try_from(lag) {
        Ok(lag) if (1..=MAX_DURABLE_LAG).contains(&u64::from(lag)) => lag << LEN_BITS,
        _ => 0,
    };
    payload_len as u32 | lag_bits
}

#[cfg(any(test, feature = "test-util"))]
/// Sets the durable lag of every record framed in `frames` (whole records back to back, as
/// [`encode`] wrote them) from `durable_seq`, the last sequence number known durable, and
/// checksums each again. Done when the records are written, so the lag is as small as it can be
/// proven.
pub fn set_durable_lags(frames: &mut [u8], durable_seq: u64) {
    stamp(frames, Framing::Plain, Some(durable_seq), None);
}

/// Stamps every chained record in `frames` (whole records back to back, as
/// [`encode_unstamped`] wrote them): its chain value, following on from `chain` (the value of
/// the record before the first; left at the last one's), its durable lag from `durable_seq`,
/// and its checksum. Returns the last record's sequence number and checksum framed with a lag of
/// 0 (what a snapshot's `record_crc` holds), if any record was stamped.
pub fn stamp_chained(frames: &mut [u8], durable_seq: u64, chain: &mut ChainValue) -> Option<(u64, u32)> {
    stamp(frames, Framing::Chained, Some(durable_seq), Some(chain))
}

/// [`set_durable_lags`] and [`stamp_chained`]; `durable_seq` `None` writes a lag of 0.
fn stamp(
    frames: &mut [u8],
    framing: Framing,
    durable_seq: Option<u64>,
    mut chain: Option<&mut ChainValue>,
) -> Option<(u64, u32)> {
    let mut rest = frames;
    let mut last_crc = None;
    while !rest.is_empty() {
        let Some((raw, after)) = std::mem::take(&mut rest).split_first_chunk_mut::<HEADER_LEN>() else {
            debug_assert!(false, "frames end inside a record header");
            return last_crc;
        };
        let mut header = RecordHeader::from_array(raw);
        let Some((body, next)) = after.split_at_mut_checked(framing.overhead() - HEADER_LEN + header.payload_len())
        else {
            debug_assert!(false, "frames end inside record {}", header.seq);
            return last_crc;
        };
        debug_assert!(
            durable_seq.is_none_or(|d| header.seq > d),
            "record {} written again after it was durable",
            header.seq
        );
        let (link, payload) = body.split_at_mut(framing.overhead() - HEADER_LEN);
        if let Some(chain) = chain.as_deref_mut() {
            *chain = chain::chain_next(chain, header.seq, payload);
            link.copy_from_slice(chain.as_bytes());
        }
        if next.is_empty() {
            // Only the last record's lag-0 checksum is asked for (a snapshot names the record it
            // follows by it), not a second CRC of every record of the batch.
            last_crc = Some((header.seq, checksum_framed(len_field(payload.len(), 0), header.seq, link, payload)));
        }
        header.len_field = len_field(payload.len(), durable_seq.map_or(0, |d| header.seq.saturating_sub(d)));
        header.crc = checksum_framed(header.len_field, header.seq, link, payload);
        *raw = header.encode();
        rest = next;
    }
    last_crc
}

/// CRC-32 of a record: its length field and sequence number as stored, then its payload.
#[inline]
pub fn checksum(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// CRC-32 of a record of any framing: its length field and sequence number as stored, its
/// chain value (`link`, empty in [`Framing::Plain`]), then its payload.
#[inline]
pub fn checksum_framed(len: u32, seq: u64, link: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(link);
    h.update(payload);
    h.finalize()
}

#[cfg(any(test, feature = "test-util"))]
/// Appends one framed record to `out` ([`Framing::Plain`], segment versions 1 to 3).
#[inline]
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD_LEN, "payload of {} bytes", payload.len());
    let len_field = len_field(payload.len(), 0);
    let header = RecordHeader { len_field, seq, crc: checksum(len_field, seq, payload) };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
}

/// Appends one chained record to `out` with a zero chain value and checksum, for
/// [`stamp_chained`] to complete when it is written.
#[inline]
pub fn encode_unstamped(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD_LEN, "payload of {} bytes", payload.len());
    let header = RecordHeader { len_field: len_field(payload.len(), 0), seq, crc: 0 };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&[0; CHAIN_BYTES]);
    out.extend_from_slice(payload);
}

#[cfg(any(test, feature = "test-util"))]
/// Appends one whole chained record (lag 0) after the record whose chain value is `chain`,
/// which moves on to this one's (for tests, fixtures and tools that write a log by hand).
pub fn encode_chained(seq: u64, payload: &[u8], chain: &mut ChainValue, out: &mut Vec<u8>) {
    let start = out.len();
    encode_unstamped(seq, payload, out);
    stamp(&mut out[start..], Framing::Chained, None, Some(chain));
}

/// What the bytes at some offset of a segment are.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record with a good checksum.
    Record {
        /// Its sequence number.
        seq: u64,
        /// Its payload (one event's JSON).
        payload: &'a [u8],
        /// Header plus payload.
        frame_len: usize,
        /// As written in its length field (0: none).
        durable_lag: u64,
        /// Its chain value as stored ([`Framing::Chained`] only).
        chain: Option<ChainValue>,
    },
    /// The buffer ends inside a record whose header is plausible: what a torn write leaves.
    Incomplete,
    /// The bytes cannot be the start of a valid record.
    Corrupt(String),
}

/// Decodes the record at the start of `buf` (which must not be empty), framed as in segment
/// versions 1 to 3.
#[inline]
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    decode_framed(buf, Framing::Plain)
}

/// Decodes the record at the start of `buf` (which must not be empty) framed as `framing`.
#[inline]
pub fn decode_framed(buf: &[u8], framing: Framing) -> Decoded<'_> {
    debug_assert!(!buf.is_empty());
    let Ok(header) = RecordHeader::decode(buf) else {
        return Decoded::Incomplete;
    };
    let payload_bytes = header.payload_len();
    if payload_bytes == 0 || payload_bytes > MAX_PAYLOAD_LEN {
        return Decoded::Corrupt(format!("record length {payload_bytes} is outside 1..={MAX_PAYLOAD_LEN}"));
    }
    let overhead = framing.overhead();
    let end = overhead + payload_bytes;
    let Some(body) = buf.get(HEADER_LEN..end) else {
        return Decoded::Incomplete;
    };
    let (link, payload) = body.split_at(overhead - HEADER_LEN);
    let actual = checksum_framed(header.len_field, header.seq, link, payload);
    if actual != header.crc {
        let stored = header.crc;
        return Decoded::Corrupt(format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"));
    }
    let chain = <[u8; CHAIN_BYTES]>::try_from(link).ok().map(ChainValue);
    Decoded::Record { seq: header.seq, payload, frame_len: end, durable_lag: durable_lag(header.len_field), chain }
}

/// True if `buf` (which [`decode`] called incomplete) is exactly one valid record whose length
/// field alone was damaged: a bit flip, not a torn write.
pub fn length_field_damaged(buf: &[u8]) -> bool {
    let Some(payload) = buf.get(HEADER_LEN..).filter(|p| !p.is_empty() && p.len() <= MAX_PAYLOAD_LEN) else {
        return false;
    };
    let Ok(header) = RecordHeader::decode(buf) else {
        return false;
    };
    // The lag bits as they stand: a flip in the length bits alone is what this looks for.
    let field = payload.len() as u32 | (header.len_field & !LEN_MASK);
    checksum(field, header.seq, payload) == header.crc
}

/// True if a whole valid record (any sequence number) starts anywhere in `buf[1..]`: evidence
/// that damage at the start of `buf` is not a torn final write.
pub fn valid_record_follows(buf: &[u8]) -> bool {
    (1..buf.len().saturating_sub(HEADER_LEN - 1)).any(|i| matches!(decode(&buf[i..]), Decoded::Record { .. }))
}

/// The first whole valid record in `buf[1..]` (framed as `framing`) whose durable lag proves
/// that the record `seq` was durable before it was written, as (offset in `buf`, its sequence
/// number).
pub fn durability_proof_follows(buf: &[u8], seq: u64, framing: Framing) -> Option<(usize, u64)> {
    (1..buf.len().saturating_sub(HEADER_LEN - 1)).find_map(|i| match decode_framed(&buf[i..], framing) {
        Decoded::Record { seq: later, durable_lag, .. } if durable_lag > 0 && later - durable_lag >= seq => {
            Some((i, later))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_and_refuses_short_input() {
        let h = RecordHeader { len_field: len_field(300, 7), seq: 0x0102_0304_0506_0708, crc: 0xdead_beef };
        let raw = h.encode();
        assert_eq!(RecordHeader::decode(&raw), Ok(h));
        assert_eq!((h.payload_len(), durable_lag(h.len_field)), (300, 7));
        assert_eq!(raw[RecordHeader::SEQ_OFFSET], 0x08, "little-endian, at its offset");
        for cut in 0..HEADER_LEN {
            assert_eq!(RecordHeader::decode(&raw[..cut]), Err(ShortInput { needed: HEADER_LEN, got: cut }));
        }
        assert_eq!(len_field(1, MAX_DURABLE_LAG + 1), 1, "a lag too large is written as unknown");
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 1..512)) {
            let mut buf = Vec::new();
            encode(seq, &payload, &mut buf);
            prop_assert_eq!(decode(&buf), Decoded::Record { seq, payload: &payload, frame_len: buf.len(), durable_lag: 0, chain: None });
            let lag = 1 + seq % MAX_DURABLE_LAG;
            if seq >= lag {
                let mut lagged = buf.clone();
                set_durable_lags(&mut lagged, seq - lag);
                prop_assert_eq!(decode(&lagged), Decoded::Record { seq, payload: &payload, frame_len: buf.len(), durable_lag: lag, chain: None });
                // The lag is covered by the checksum: changing it alone is damage.
                let mut cleared = lagged.clone();
                cleared[3] ^= 0x80;
                prop_assert!(matches!(decode(&cleared), Decoded::Corrupt(_)));
            }
            // Every strict prefix is incomplete, never a record and never silently accepted.
            for cut in 1..buf.len() {
                prop_assert_eq!(decode(&buf[..cut]), Decoded::Incomplete);
            }
        }

        #[test]
        fn chained_records_round_trip_and_link(seq in 1..u64::MAX / 2, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..256), 1..6)) {
            let mut by_hand = Vec::new();
            let mut chain = chain::GENESIS;
            let mut unstamped = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                encode_chained(seq + i as u64, p, &mut chain, &mut by_hand);
                encode_unstamped(seq + i as u64, p, &mut unstamped);
            }
            // The writer's way (framed, then stamped at once) gives the same chain; lags aside.
            let mut stamped_chain = chain::GENESIS;
            let last_crc = stamp_chained(&mut unstamped, seq - 1, &mut stamped_chain);
            prop_assert_eq!(stamped_chain, chain);
            let (mut at, mut prev) = (0, chain::GENESIS);
            for (i, p) in payloads.iter().enumerate() {
                let Decoded::Record { seq: s, payload, frame_len, chain: Some(link), durable_lag } = decode_framed(&by_hand[at..], Framing::Chained) else {
                    panic!("record {i} does not decode");
                };
                prop_assert_eq!((s, payload, durable_lag), (seq + i as u64, &p[..], 0));
                prev = chain::chain_next(&prev, s, payload);
                prop_assert_eq!(link, prev);
                let again = decode_framed(&unstamped[at..], Framing::Chained);
                let stamped_ok = matches!(again, Decoded::Record { chain: Some(c), durable_lag: l, .. } if c == link && l == i as u64 + 1);
                prop_assert!(stamped_ok);
                if i + 1 == payloads.len() {
                    // The lag-0 checksum is the one the record framed by hand has.
                    prop_assert_eq!(last_crc, RecordHeader::decode(&by_hand[at..]).ok().map(|h| (s, h.crc)));
                }
                for bit in 0..frame_len * 8 {
                    let mut b = by_hand[at..at + frame_len].to_vec();
                    b[bit / 8] ^= 1 << (bit % 8);
                    prop_assert!(!matches!(decode_framed(&b, Framing::Chained), Decoded::Record { .. }), "bit {} flipped went unnoticed", bit);
                }
                at += frame_len;
            }
        }

        #[test]
        fn every_bit_flip_is_detected(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 1..64)) {
            let mut buf = Vec::new();
            encode(seq, &payload, &mut buf);
            for bit in 0..buf.len() * 8 {
                let mut b = buf.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                prop_assert!(!matches!(decode(&b), Decoded::Record { .. }), "bit {} flipped went unnoticed", bit);
            }
        }
    }
}
