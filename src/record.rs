//! Record framing. A record is a 16-byte header followed by its payload:
//!
//! ```text
//! | len: u32 LE | seq: u64 LE | crc: u32 LE | payload: len bytes |
//! ```
//!
//! `crc` is CRC-32 (IEEE, `crc32fast`) over `len`, `seq` and the payload, so a damaged length or
//! sequence number is caught like damaged data.

pub const HEADER_LEN: usize = 16;
/// Upper bound on a payload; a length above it is damage, never a torn write.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;

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
    /// A whole record with a good checksum; `frame_len` is header plus payload.
    Record { seq: u64, payload: &'a [u8], frame_len: usize },
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
    if len == 0 || len as usize > MAX_PAYLOAD_LEN {
        return Decoded::Corrupt(format!("record length {len} is outside 1..={MAX_PAYLOAD_LEN}"));
    }
    let end = HEADER_LEN + len as usize;
    if buf.len() < end {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER_LEN..end];
    let actual = checksum(len, seq, payload);
    if actual != crc {
        return Decoded::Corrupt(format!("checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"));
    }
    Decoded::Record { seq, payload, frame_len: end }
}

/// True if `buf` (which [`decode`] called incomplete) is exactly one valid record whose length
/// field alone was damaged: a bit flip, not a torn write.
pub fn length_field_damaged(buf: &[u8]) -> bool {
    if buf.len() <= HEADER_LEN || buf.len() - HEADER_LEN > MAX_PAYLOAD_LEN {
        return false;
    }
    let seq = u64::from_le_bytes(buf[4..12].try_into().unwrap());
    let crc = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    checksum((buf.len() - HEADER_LEN) as u32, seq, &buf[HEADER_LEN..]) == crc
}

/// True if a whole valid record (any sequence number) starts anywhere in `buf[1..]`: evidence
/// that damage at the start of `buf` is not a torn final write.
pub fn valid_record_follows(buf: &[u8]) -> bool {
    (1..buf.len().saturating_sub(HEADER_LEN - 1)).any(|i| matches!(decode(&buf[i..]), Decoded::Record { .. }))
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
            prop_assert_eq!(decode(&buf), Decoded::Record { seq, payload: &payload, frame_len: buf.len() });
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
