//! Segment files. The log is a sequence of segments named by the sequence number of their first
//! record (`00000000000000000001.wal`); each starts with a 32-byte header:
//!
//! ```text
//! | magic "ALLOCWAL" | version: u32 LE | flags: u32 LE (0) | first_seq: u64 LE | reserved: u32 (0) | crc: u32 LE |
//! ```
//!
//! `crc` covers the 28 bytes before it. Records follow back to back (see [`crate::record`]).

use crate::error::Damage;
use crate::record::{self, Decoded};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"ALLOCWAL";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const EXTENSION: &str = "wal";

pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{EXTENSION}")
}

/// The first sequence number a segment file name stands for.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub fn encode_header(first_seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a header; returns the first sequence number it records.
pub fn decode_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("segment header is {} bytes, expected {HEADER_LEN}", bytes.len()));
    }
    if &bytes[0..8] != MAGIC {
        return Err("not a segment file (bad magic)".into());
    }
    let stored = u32::from_le_bytes(bytes[28..32].try_into().unwrap());
    if crc32fast::hash(&bytes[..28]) != stored {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version} is not supported (this build reads version {FORMAT_VERSION})"
        ));
    }
    Ok(u64::from_le_bytes(bytes[16..24].try_into().unwrap()))
}

/// Where a record sits in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPos {
    pub seq: u64,
    pub offset: u64,
    pub frame_len: u32,
}

/// How the scan of a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a valid record.
    Clean,
    /// The segment ends in an incomplete record (or zeros) starting at `offset`: a torn write.
    Torn { offset: u64, len: u64 },
    /// Damage that is not a torn write.
    Corrupt(Damage),
}

#[derive(Debug)]
pub struct Scan {
    pub first_seq: u64,
    /// Bytes up to the end of the last valid record visited.
    pub valid_len: u64,
    /// Sequence number the next record would have.
    pub next_seq: u64,
    pub tail: Tail,
    /// The visitor asked to stop early; `tail` is `Clean` and says nothing of the rest.
    pub stopped: bool,
}

/// What a visitor wants after seeing a record.
pub type Visit<'a> = dyn FnMut(RecordPos, &[u8]) -> Result<bool, String> + 'a;

/// Walks every record of a segment, handing each to `visit` (which returns false to stop).
/// `expected_first` is the sequence number the file name promises. Whether a torn tail is
/// acceptable is the caller's call: only in the last segment.
pub fn scan(path: &Path, bytes: &[u8], expected_first: u64, visit: &mut Visit<'_>) -> Scan {
    scan_from(path, bytes, expected_first, 0, expected_first, visit)
}

/// Like [`scan`], but starts at `start_offset` (a record boundary found earlier, 0 for the
/// header) expecting `start_seq` there.
pub fn scan_from(
    path: &Path,
    bytes: &[u8],
    expected_first: u64,
    start_offset: u64,
    start_seq: u64,
    visit: &mut Visit<'_>,
) -> Scan {
    let damage = |offset: u64, seq: u64, reason: String| Damage { file: PathBuf::from(path), offset, seq, reason };
    let first_seq = match decode_header(bytes) {
        Ok(s) => s,
        Err(reason) => {
            let tail = if bytes.len() < HEADER_LEN && bytes == &encode_header(expected_first)[..bytes.len()] {
                Tail::Torn { offset: 0, len: bytes.len() as u64 }
            } else {
                Tail::Corrupt(damage(0, expected_first, reason))
            };
            return Scan { first_seq: expected_first, valid_len: 0, next_seq: expected_first, tail, stopped: false };
        }
    };
    if first_seq != expected_first {
        return Scan {
            first_seq,
            valid_len: 0,
            next_seq: expected_first,
            stopped: false,
            tail: Tail::Corrupt(damage(
                0,
                expected_first,
                format!(
                    "header says the segment starts at sequence number {first_seq}, its name says {expected_first}"
                ),
            )),
        };
    }
    let (mut offset, mut next_seq) =
        if start_offset == 0 { (HEADER_LEN, first_seq) } else { (start_offset as usize, start_seq) };
    let mut stopped = false;
    let tail = loop {
        if offset == bytes.len() {
            break Tail::Clean;
        }
        let rest = &bytes[offset..];
        match record::decode(rest) {
            Decoded::Record { seq, payload, frame_len } => {
                if seq != next_seq {
                    break Tail::Corrupt(damage(
                        offset as u64,
                        next_seq,
                        format!("record has sequence number {seq}, expected {next_seq}"),
                    ));
                }
                let pos = RecordPos { seq, offset: offset as u64, frame_len: frame_len as u32 };
                match visit(pos, payload) {
                    Ok(true) => {}
                    Ok(false) => {
                        offset += frame_len;
                        next_seq += 1;
                        stopped = true;
                        break Tail::Clean;
                    }
                    Err(reason) => break Tail::Corrupt(damage(offset as u64, seq, reason)),
                }
                offset += frame_len;
                next_seq += 1;
            }
            Decoded::Incomplete => {
                if record::length_field_damaged(rest) {
                    break Tail::Corrupt(damage(
                        offset as u64,
                        next_seq,
                        "record length field is damaged (the rest of the file is exactly one valid record)".into(),
                    ));
                }
                if record::valid_record_follows(rest) {
                    break Tail::Corrupt(damage(
                        offset as u64,
                        next_seq,
                        "record length runs past the end of the file, but valid records follow".into(),
                    ));
                }
                break Tail::Torn { offset: offset as u64, len: rest.len() as u64 };
            }
            Decoded::Corrupt(reason) => {
                if rest.iter().all(|&b| b == 0) {
                    // A file system may leave zeros where a write never landed.
                    break Tail::Torn { offset: offset as u64, len: rest.len() as u64 };
                }
                break Tail::Corrupt(damage(offset as u64, next_seq, reason));
            }
        }
    };
    Scan { first_seq, valid_len: offset as u64, next_seq, tail, stopped }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(n: u64) -> Vec<u8> {
        let mut b = encode_header(1).to_vec();
        for seq in 1..=n {
            record::encode(seq, format!("payload {seq}").as_bytes(), &mut b);
        }
        b
    }

    fn count(bytes: &[u8]) -> (u64, Tail) {
        let mut n = 0;
        let s = scan(Path::new("x.wal"), bytes, 1, &mut |_, _| {
            n += 1;
            Ok(true)
        });
        (n, s.tail)
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.wal"), None);
    }

    #[test]
    fn truncation_is_torn_and_flips_are_corrupt() {
        let full = segment(5);
        assert_eq!(count(&full), (5, Tail::Clean));
        for cut in HEADER_LEN..full.len() {
            let (n, tail) = count(&full[..cut]);
            assert!(matches!(tail, Tail::Torn { .. } | Tail::Clean), "cut {cut}: {tail:?}");
            assert!(n <= 5);
        }
        for bit in 0..(full.len() * 8) {
            let mut b = full.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let (n, tail) = count(&b);
            assert!(n < 5, "bit {bit}: all records still read");
            assert!(matches!(tail, Tail::Corrupt(_)), "bit {bit}: {tail:?}");
        }
    }
}
