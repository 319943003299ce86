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

pub const HEADER_LEN: usize = 16;
/// Upper bound on a payload; a length above it is damage, never a torn write.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// The low bits of the length field that hold the payload length (`MAX_PAYLOAD_LEN` needs 21).
const LEN_BITS: u32 = 21;
const LEN_MASK: u32 = (1 << LEN_BITS) - 1;
/// The largest durable lag the length field holds; a larger one is written as 0 (unknown).
pub const MAX_DURABLE_LAG: u64 = (1 << (32 - LEN_BITS)) - 1;

/// The payload length a length field holds (the durable lag masked off).
pub fn payload_len(len_field: u32) -> usize {
    (len_field & LEN_MASK) as usize
}

/// The durable lag a length field holds (0: none recorded).
pub fn durable_lag(len_field: u32) -> u64 {
    u64::from(len_field >> LEN_BITS)
}

/// Sets the durable lag of every record framed in `frames` (whole records back to back, as
/// [`encode`] wrote them) from `durable_seq`, the last sequence number known durable, and
/// checksums each again. Done when the records are written, so the lag is as small as it can be
/// proven.
pub fn set_durable_lags(frames: &mut [u8], durable_seq: u64) {
    let mut at = 0;
    while at < frames.len() {
        let frame = &mut frames[at..];
        let len = payload_len(u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")));
        let seq = u64::from_le_bytes(frame[4..12].try_into().expect("8 bytes"));
        debug_assert!(seq > durable_seq, "record {seq} written again after {durable_seq} was durable");
        let lag = seq.saturating_sub(durable_seq);
        let lag_bits = if (1..=MAX_DURABLE_LAG).contains(&lag) { (lag as u32) << LEN_BITS } else { 0 };
        let field = len as u32 | lag_bits;
        let end = HEADER_LEN + len;
        let crc = checksum(field, seq, &frame[HEADER_LEN..end]);
        frame[0..4].copy_from_slice(&field.to_le_bytes());
        frame[12..16].copy_from_slice(&crc.to_le_bytes());
        at += end;
    }
}

pub fn checksum(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD_LEN, "payload of {} bytes", payload.len());
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&checksum(len, seq, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record with a good checksum; `frame_len` is header plus payload; `durable_lag`
    /// as written in its length field (0: none).
    Record { seq: u64, payload: &'a [u8], frame_len: usize, durable_lag: u64 },
    /// The buffer ends inside a record whose header is plausible: what a torn write leaves.
    Incomplete,
    /// The bytes cannot be the start of a valid record.
    Corrupt(String),
}

/// Decodes the record at the start of `buf` (which must not be empty).
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    debug_assert!(!buf.is_empty());
    if buf.len() < HEADER_LEN {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap());
    let seq = u64::from_le_bytes(buf[4..12].try_into().unwrap());
    let crc = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    let payload_bytes = payload_len(len);
    if payload_bytes == 0 || payload_bytes > MAX_PAYLOAD_LEN {
        return Decoded::Corrupt(format!("record length {payload_bytes} is outside 1..={MAX_PAYLOAD_LEN}"));
    }
    let end = HEADER_LEN + payload_bytes;
    if buf.len() < end {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER_LEN..end];
    let actual = checksum(len, seq, payload);
    if actual != crc {
        return Decoded::Corrupt(format!("checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"));
    }
    Decoded::Record { seq, payload, frame_len: end, durable_lag: durable_lag(len) }
}

/// True if `buf` (which [`decode`] called incomplete) is exactly one valid record whose length
/// field alone was damaged: a bit flip, not a torn write.
pub fn length_field_damaged(buf: &[u8]) -> bool {
    if buf.len() <= HEADER_LEN || buf.len() - HEADER_LEN > MAX_PAYLOAD_LEN {
        return false;
    }
    let seq = u64::from_le_bytes(buf[4..12].try_into().unwrap());
    let crc = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    let len = (buf.len() - HEADER_LEN) as u32;
    // The lag bits as they stand: a flip in the length bits alone is what this looks for.
    let field = len | (u32::from_le_bytes(buf[0..4].try_into().unwrap()) & !LEN_MASK);
    checksum(field, seq, &buf[HEADER_LEN..]) == crc
}

/// True if a whole valid record (any sequence number) starts anywhere in `buf[1..]`: evidence
/// that damage at the start of `buf` is not a torn final write.
pub fn valid_record_follows(buf: &[u8]) -> bool {
    (1..buf.len().saturating_sub(HEADER_LEN - 1)).any(|i| matches!(decode(&buf[i..]), Decoded::Record { .. }))
}

/// The first whole valid record in `buf[1..]` whose durable lag proves that the record
/// `seq` was durable before it was written, as (offset in `buf`, its sequence number).
pub fn durability_proof_follows(buf: &[u8], seq: u64) -> Option<(usize, u64)> {
    (1..buf.len().saturating_sub(HEADER_LEN - 1)).find_map(|i| match decode(&buf[i..]) {
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

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 1..512)) {
            let mut buf = Vec::new();
            encode(seq, &payload, &mut buf);
            prop_assert_eq!(decode(&buf), Decoded::Record { seq, payload: &payload, frame_len: buf.len(), durable_lag: 0 });
            let lag = 1 + seq % MAX_DURABLE_LAG;
            if seq >= lag {
                let mut lagged = buf.clone();
                set_durable_lags(&mut lagged, seq - lag);
                prop_assert_eq!(decode(&lagged), Decoded::Record { seq, payload: &payload, frame_len: buf.len(), durable_lag: lag });
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
