//! Segment files. The log is a sequence of segments named by the sequence number of their first
//! record (`00000000000000000001.wal`); each starts with a 32-byte header:
//!
//! ```text
//! | magic "ALLOCWAL" | version: u32 LE | flags: u32 LE (0) | first_seq: u64 LE | reserved: u32 (0) | crc: u32 LE |
//! ```
//!
//! `crc` covers the 28 bytes before it. Records follow back to back (see [`crate::log::record`]).
//!
//! Version 2 segments are *pre-filled*: the writer zero-fills the file ahead of its records (and
//! makes the zeros durable with the records' own fsyncs), so an fsync after an append overwrites
//! blocks the file system already holds instead of growing the file, which on ext4 takes about
//! half the time. Zeros after the last record are free space, not damage. Version 1 segments
//! (records back to back to the end of the file) are still read and appended to.
//!
//! Version 3 adds the durable lag to records (see [`crate::log::record`]): damage followed by a valid
//! record whose lag proves the damaged one durable is damage, never a torn tail, whatever its
//! bytes look like; damage that nothing proves durable lies in the last write, which is cut.
//!
//! Version 4 chains its records (see `log/chain.rs`): the header grows to 64 bytes, the
//! 32 after the version 3 layout holding the chain value in force at the segment's start (of
//! the record before its first), so a segment can be checked alone; the reserved field holds
//! their CRC-32, which the header's own checksum covers. Records carry their chain value
//! ([`record::Framing::Chained`]).

use crate::error::Damage;
use crate::log::chain::{self, ChainValue, CHAIN_BYTES};
use crate::log::record::{self, Decoded, Framing, RecordHeader};
use std::path::{Path, PathBuf};

use crate::log::fields;

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"ALLOCWAL";
/// The version this build writes.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version this build reads (and appends to, without pre-filling).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// The first version whose segments are pre-filled with zeros (free space after the records).
const PREFILLED_SINCE_VERSION: u32 = 2;
/// The first version whose records carry durable lags, each write starting at a sector.
const DURABLE_LAGS_SINCE_VERSION: u32 = 3;
/// The first version whose records are chained (and whose header holds the chain's start).
pub const CHAINED_SINCE_VERSION: u32 = 4;
/// A sector: the unit a disk writes whole or not at all. A torn write leaves whole sectors of
/// a pre-filled segment still zero.
pub const SECTOR_BYTES: u64 = 512;
/// Bytes of the header of a segment written now (`Header::CHAINED_LEN`); records follow.
pub const HEADER_LEN: usize = Header::CHAINED_LEN;
#[cfg(any(test, feature = "test-util"))]
/// Bytes of a version 1 to 3 header (`Header::LEN`), also the start of a version 4 one.
pub const BASE_HEADER_LEN: usize = Header::LEN;
/// The file name extension of segments.
pub const EXTENSION: &str = "wal";
/// Digits of the sequence number in a segment's file name (zero-padded).
const FILE_NAME_DIGITS: usize = 20;

/// The file name of the segment whose first record is `first_seq`.
pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:0FILE_NAME_DIGITS$}.{EXTENSION}")
}

/// The first sequence number a segment file name stands for.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    if stem.len() != FILE_NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The header of a segment written now ([`FORMAT_VERSION`]) whose first record follows the one
/// with chain value `chain_start` ([`chain::GENESIS`] where the chain begins).
pub fn encode_header(first_seq: u64, chain_start: &ChainValue) -> [u8; HEADER_LEN] {
    let mut raw = [0; HEADER_LEN];
    Header { first_seq, version: FORMAT_VERSION, chain_start: Some(*chain_start) }.encode_into(&mut raw);
    raw
}

/// A header of an older readable `version` (for tests and fixtures); version 4 starts the chain.
#[cfg(any(test, feature = "test-util"))]
pub fn encode_header_version(first_seq: u64, version: u32) -> Vec<u8> {
    debug_assert!((OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version));
    let chain_start = (version >= CHAINED_SINCE_VERSION).then_some(chain::GENESIS);
    let header = Header { first_seq, version, chain_start };
    let mut raw = vec![0; header.records_offset()];
    header.encode_into(&mut raw);
    raw
}

/// A segment header (`docs/format.md`, "Segment files"): what it says, and its layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Sequence number of the segment's first record; equals the number in its file name.
    pub first_seq: u64,
    /// Format version, [`OLDEST_READABLE_VERSION`] to [`FORMAT_VERSION`].
    pub version: u32,
    /// The chain value of the record before the first (version 4 on; [`chain::GENESIS`] where
    /// the chain begins).
    pub chain_start: Option<ChainValue>,
}

impl Header {
    /// Where [`MAGIC`] sits.
    pub const MAGIC_OFFSET: usize = 0;
    /// Where the format version sits.
    pub const VERSION_OFFSET: usize = Self::MAGIC_OFFSET + MAGIC.len();
    /// Where the flags sit (reserved: 0).
    pub const FLAGS_OFFSET: usize = Self::VERSION_OFFSET + size_of::<u32>();
    /// Where the first sequence number sits.
    pub const FIRST_SEQ_OFFSET: usize = Self::FLAGS_OFFSET + size_of::<u32>();
    /// Where the reserved field sits (0).
    pub const RESERVED_OFFSET: usize = Self::FIRST_SEQ_OFFSET + size_of::<u64>();
    /// Where the checksum sits; it covers the bytes before it.
    pub const CRC_OFFSET: usize = Self::RESERVED_OFFSET + size_of::<u32>();
    /// Bytes of a version 1 to 3 header, checksummed by the field at [`Self::CRC_OFFSET`].
    pub const LEN: usize = Self::CRC_OFFSET + size_of::<u32>();
    /// Version 4: where the CRC-32 of the chain start sits (the reserved field of version 3).
    pub const CHAIN_CRC_OFFSET: usize = Self::RESERVED_OFFSET;
    /// Version 4: where the chain start sits, after the version 3 layout.
    pub const CHAIN_START_OFFSET: usize = Self::LEN;
    /// Bytes of a version 4 header.
    pub const CHAINED_LEN: usize = Self::CHAIN_START_OFFSET + CHAIN_BYTES;

    /// Bytes of this header: where the first record starts.
    pub fn records_offset(&self) -> usize {
        if self.chained() {
            Self::CHAINED_LEN
        } else {
            Self::LEN
        }
    }

    /// The records are chained (version 4 on; see `log/chain.rs`).
    pub fn chained(&self) -> bool {
        self.version >= CHAINED_SINCE_VERSION
    }

    /// How the records are framed.
    pub fn framing(&self) -> Framing {
        if self.chained() {
            Framing::Chained
        } else {
            Framing::Plain
        }
    }

    /// Zeros after the last record are free space (version 2 on).
    pub fn prefilled(&self) -> bool {
        self.version >= PREFILLED_SINCE_VERSION
    }

    /// The writer records each record's durable lag (version 3 on; see [`crate::log::record`]).
    pub fn records_durable_lags(&self) -> bool {
        self.version >= DURABLE_LAGS_SINCE_VERSION
    }

    /// Writes the header's bytes, checksummed (flags 0; the reserved field 0 before version 4)
    /// to the start of `out`, which holds at least `records_offset()` bytes.
    pub fn encode_into(&self, out: &mut [u8]) {
        let mut raw = [0; Self::LEN];
        fields::put(&mut raw, Self::MAGIC_OFFSET, *MAGIC);
        fields::put(&mut raw, Self::VERSION_OFFSET, self.version.to_le_bytes());
        fields::put(&mut raw, Self::FIRST_SEQ_OFFSET, self.first_seq.to_le_bytes());
        if let Some(start) = self.chain_start.filter(|_| self.chained()) {
            fields::put(&mut raw, Self::CHAIN_CRC_OFFSET, crc32fast::hash(start.as_bytes()).to_le_bytes());
            out[Self::CHAIN_START_OFFSET..Self::CHAINED_LEN].copy_from_slice(start.as_bytes());
        }
        let crc = crc32fast::hash(&raw[..Self::CRC_OFFSET]);
        fields::put(&mut raw, Self::CRC_OFFSET, crc.to_le_bytes());
        out[..Self::LEN].copy_from_slice(&raw);
    }

    /// Checks and reads the header at the start of `bytes`: magic, checksum, a readable
    /// version and flags of 0, in that order; then, in version 4, the chain start.
    pub fn decode(bytes: &[u8]) -> Result<Header, String> {
        let mut header = Self::decode_base(bytes)?;
        if header.chained() {
            let start = bytes
                .get(Self::CHAIN_START_OFFSET..Self::CHAINED_LEN)
                .ok_or_else(|| format!("segment header is {} bytes, expected {}", bytes.len(), Self::CHAINED_LEN))?;
            let raw = fields::prefix::<{ Self::LEN }>(bytes).map_err(|e| format!("segment header is {e}"))?;
            if crc32fast::hash(start) != fields::u32_at(raw, Self::CHAIN_CRC_OFFSET) {
                return Err("segment header checksum mismatch (chain start)".into());
            }
            let mut value = [0; CHAIN_BYTES];
            value.copy_from_slice(start);
            header.chain_start = Some(ChainValue(value));
        }
        Ok(header)
    }

    /// The version 1 to 3 part of a header (all of it before version 4).
    fn decode_base(bytes: &[u8]) -> Result<Header, String> {
        let raw = fields::prefix::<{ Self::LEN }>(bytes).map_err(|e| format!("segment header is {e}"))?;
        if fields::get(raw, Self::MAGIC_OFFSET) != *MAGIC {
            return Err("not a segment file (bad magic)".into());
        }
        if crc32fast::hash(&raw[..Self::CRC_OFFSET]) != fields::u32_at(raw, Self::CRC_OFFSET) {
            return Err("segment header checksum mismatch".into());
        }
        let version = fields::u32_at(raw, Self::VERSION_OFFSET);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "segment format version {version} is not supported (this build reads versions \
                 {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
            ));
        }
        let flags = fields::u32_at(raw, Self::FLAGS_OFFSET);
        if flags != 0 {
            return Err(format!("segment header flags are {flags:#x}, expected 0"));
        }
        Ok(Header { first_seq: fields::u64_at(raw, Self::FIRST_SEQ_OFFSET), version, chain_start: None })
    }
}

const _: () = assert!(Header::LEN == 32, "docs/format.md: a segment header is 32 bytes");
const _: () = assert!(Header::CRC_OFFSET == 28 && Header::FIRST_SEQ_OFFSET == 16);
const _: () = assert!(Header::CHAINED_LEN == 64 && Header::CHAIN_CRC_OFFSET == 24, "docs/format.md: version 4");
const _: () = assert!(Header::CHAINED_LEN as u64 <= SECTOR_BYTES, "a segment's first write shares the header's sector");
const _: () = assert!(FORMAT_VERSION == CHAINED_SINCE_VERSION, "this build writes chained segments");
const _: () =
    assert!(FORMAT_VERSION >= DURABLE_LAGS_SINCE_VERSION && DURABLE_LAGS_SINCE_VERSION > PREFILLED_SINCE_VERSION);

/// Checks a header ([`Header::decode`]).
pub fn decode_header(bytes: &[u8]) -> Result<Header, String> {
    Header::decode(bytes)
}

/// Where a record sits in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPos {
    /// The record's sequence number.
    pub seq: u64,
    /// Byte offset of its frame (header) in the segment.
    pub offset: u64,
    /// Header plus payload (plus chain value in version 4).
    pub frame_len: u32,
    /// Its chain value as stored (version 4 on).
    pub chain: Option<ChainValue>,
}

/// How the scan of a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a valid record.
    Clean,
    /// The segment ends in an incomplete record (or zeros) starting at `offset`: a torn write.
    Torn {
        /// Where the torn bytes start (a record boundary; 0 for a torn header).
        offset: u64,
        /// How many bytes from `offset` are torn: in a pre-filled segment up to the last
        /// written byte (the zeros after it are free space), else to the end of the file.
        len: u64,
    },
    /// Damage that is not a torn write.
    Corrupt(Damage),
}

/// What a scan of one segment found.
#[derive(Debug)]
pub struct Scan {
    /// The first sequence number the header says (the expected one if it could not be read).
    #[cfg(any(test, feature = "test-util"))]
    pub first_seq: u64,
    /// The header's format version (0 if the header could not be read).
    #[cfg(any(test, feature = "test-util"))]
    pub version: u32,
    /// Bytes up to the end of the last valid record visited. In a pre-filled segment that ends
    /// cleanly, only zeros follow.
    pub valid_len: u64,
    /// Sequence number the next record would have.
    pub next_seq: u64,
    /// How the segment ended.
    pub tail: Tail,
    /// The visitor asked to stop early; `tail` is `Clean` and says nothing of the rest.
    pub stopped: bool,
    /// The header's chain start (version 4 on; `None` if the header could not be read).
    pub chain_start: Option<ChainValue>,
    /// The chain value of record `next_seq - 1` (the last valid one visited, or the chain start).
    pub chain: Option<ChainValue>,
}

impl Scan {
    /// A scan that read no record: it stopped at the header.
    fn at_header(header: Option<Header>, expected_first: u64, tail: Tail) -> Scan {
        #[cfg(not(any(test, feature = "test-util")))]
        let _ = header;
        Scan {
            #[cfg(any(test, feature = "test-util"))]
            first_seq: header.map_or(expected_first, |h| h.first_seq),
            #[cfg(any(test, feature = "test-util"))]
            version: header.map_or(0, |h| h.version),
            valid_len: 0,
            next_seq: expected_first,
            tail,
            stopped: false,
            chain_start: header.and_then(|h| h.chain_start),
            chain: header.and_then(|h| h.chain_start),
        }
    }
}

/// Where a scan starts other than at the segment's first record (see [`scan_from`]), and
/// whether it checks the chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanStart {
    /// A record boundary found earlier (0: the first record, after the header).
    pub offset: u64,
    /// The sequence number expected there.
    pub seq: u64,
    /// The chain value of the record before it (version 4; `None`: unknown, the first record
    /// read is not checked against it).
    pub chain: Option<ChainValue>,
    /// Recompute each record's chain value and compare it with the one stored (`verify`).
    pub verify_chain: bool,
}

/// What a visitor wants after seeing a record.
pub type Visit<'a> = dyn FnMut(RecordPos, &[u8]) -> Result<bool, String> + 'a;

/// Walks every record of a segment, handing each to `visit` (which returns false to stop).
/// `expected_first` is the sequence number the file name promises. Whether a torn tail is
/// acceptable is the caller's call: only in the last segment.
pub fn scan(path: &Path, bytes: &[u8], expected_first: u64, visit: &mut Visit<'_>) -> Scan {
    scan_from(path, bytes, expected_first, ScanStart::default(), visit)
}

/// Like [`scan`], but starts at `start` (a record boundary found earlier, offset 0 for the
/// first record) and checks the chain if it says so.
pub fn scan_from(path: &Path, bytes: &[u8], expected_first: u64, start: ScanStart, visit: &mut Visit<'_>) -> Scan {
    let damage = |seq: u64, reason: String| Damage { file: PathBuf::from(path), offset: 0, seq, reason };
    let header = match decode_header(bytes) {
        Ok(h) => h,
        Err(reason) => {
            // A crash while the segment was being created: the header's start, then nothing
            // (or the zeros of the pre-filled chunk written with it).
            let tail = if header_torn(bytes, expected_first) {
                Tail::Torn { offset: 0, len: bytes.len() as u64 }
            } else {
                Tail::Corrupt(damage(expected_first, reason))
            };
            return Scan::at_header(None, expected_first, tail);
        }
    };
    if header.first_seq != expected_first {
        let first_seq = header.first_seq;
        let reason =
            format!("header says the segment starts at sequence number {first_seq}, its name says {expected_first}");
        return Scan::at_header(Some(header), expected_first, Tail::Corrupt(damage(expected_first, reason)));
    }
    let (offset, next_seq, chain) = if start.offset == 0 {
        (header.records_offset(), header.first_seq, header.chain_start)
    } else {
        (start.offset as usize, start.seq, start.chain.filter(|_| header.chained()))
    };
    let mut walk = Walk {
        path,
        bytes,
        header,
        framing: header.framing(),
        offset,
        next_seq,
        chain,
        verify_chain: start.verify_chain && header.chained(),
        stopped: false,
    };
    let tail = walk.run(visit);
    Scan {
        #[cfg(any(test, feature = "test-util"))]
        first_seq: header.first_seq,
        #[cfg(any(test, feature = "test-util"))]
        version: header.version,
        valid_len: walk.offset as u64,
        next_seq: walk.next_seq,
        tail,
        stopped: walk.stopped,
        chain_start: header.chain_start,
        chain: walk.chain,
    }
}

/// Whether `bytes` (whose header does not decode) are a header a crash cut short: a prefix of
/// the header a build writes for `expected_first` (of any version), then only zeros; or, in
/// version 4, its fixed fields whole and nothing but zeros after the header (the chain start
/// and the checksums are not known beforehand): a segment that holds no record either way.
fn header_torn(bytes: &[u8], expected_first: u64) -> bool {
    let torn_against = |expected: &[u8]| {
        let landed = bytes.iter().zip(expected).take_while(|(a, b)| a == b).count();
        landed < expected.len() && bytes[landed..].iter().all(|&b| b == 0)
    };
    let fixed = &encode_header(expected_first, &chain::GENESIS)[..Header::CHAIN_CRC_OFFSET];
    let fixed_whole = bytes.starts_with(fixed) && bytes.get(HEADER_LEN..).is_none_or(|r| r.iter().all(|&b| b == 0));
    fixed_whole
        || torn_against(fixed)
        || (OLDEST_READABLE_VERSION..CHAINED_SINCE_VERSION).any(|version| {
            let mut raw = [0; Header::LEN];
            Header { first_seq: expected_first, version, chain_start: None }.encode_into(&mut raw);
            torn_against(&raw)
        })
}

/// A scan of one segment in progress: where it is and what it expects there.
struct Walk<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    header: Header,
    framing: Framing,
    /// Where the next record is expected.
    offset: usize,
    /// The sequence number it must have.
    next_seq: u64,
    /// The chain value of the record before it (version 4; `None` when not known).
    chain: Option<ChainValue>,
    /// Check each record's chain value against the one recomputed from `chain`.
    verify_chain: bool,
    stopped: bool,
}

impl Walk<'_> {
    /// Reads records until the end of the segment's records, damage, or the visitor's stop.
    fn run(&mut self, visit: &mut Visit<'_>) -> Tail {
        let bytes = self.bytes;
        loop {
            let Some(rest) = bytes.get(self.offset..).filter(|r| !r.is_empty()) else {
                return Tail::Clean;
            };
            // Version 3 starts each write at a sector (see `WalWriter::hand_off`), but a
            // segment's first: zeros up to the next sector boundary, then written bytes, are
            // that padding. Checked before decoding (once per write, on the replay's hot path).
            if self.header.records_durable_lags() && self.offset != self.header.records_offset() {
                if let Some(pad) = write_padding(rest, self.offset as u64, self.framing) {
                    self.offset += pad;
                    continue;
                }
            }
            match record::decode_framed(rest, self.framing) {
                Decoded::Record { seq, payload, frame_len, chain, .. } => {
                    if let Some(tail) = self.visit_record(seq, payload, frame_len, chain, visit) {
                        return tail;
                    }
                }
                invalid if self.header.prefilled() => return self.invalid_prefilled(rest, invalid),
                Decoded::Incomplete => return self.incomplete_unfilled(rest),
                Decoded::Corrupt(reason) => {
                    if rest.iter().all(|&b| b == 0) {
                        // A file system may leave zeros where a write never landed.
                        return self.torn(rest.len());
                    }
                    return self.corrupt(reason);
                }
            }
        }
    }

    /// Hands a valid record to the visitor and moves past it; the tail if the scan ends here.
    #[inline]
    fn visit_record(
        &mut self,
        seq: u64,
        payload: &[u8],
        frame_len: usize,
        chain: Option<ChainValue>,
        visit: &mut Visit<'_>,
    ) -> Option<Tail> {
        if seq != self.next_seq {
            return Some(self.corrupt(format!("record has sequence number {seq}, expected {}", self.next_seq)));
        }
        if let (true, Some(prev), Some(stored)) = (self.verify_chain, self.chain, chain) {
            let computed = chain::chain_next(&prev, seq, payload);
            if computed != stored {
                return Some(self.corrupt(format!(
                    "chain mismatch: the record's chain value {stored} is not the one that follows the record \
                     before it ({computed}): the record or one before it was rewritten"
                )));
            }
        }
        let pos = RecordPos { seq, offset: self.offset as u64, frame_len: frame_len as u32, chain };
        match visit(pos, payload) {
            Ok(go_on) => self.stopped = !go_on,
            Err(reason) => return Some(self.corrupt(reason)),
        }
        self.offset += frame_len;
        self.next_seq += 1;
        if chain.is_some() {
            self.chain = chain;
        }
        self.stopped.then_some(Tail::Clean)
    }

    /// Damage at the record expected here.
    fn corrupt(&self, reason: String) -> Tail {
        let file = PathBuf::from(self.path);
        Tail::Corrupt(Damage { file, offset: self.offset as u64, seq: self.next_seq, reason })
    }

    /// A torn tail of `len` bytes from here.
    fn torn(&self, len: usize) -> Tail {
        Tail::Torn { offset: self.offset as u64, len: len as u64 }
    }

    /// No valid record at the start of `rest` in a pre-filled segment (version 2 or 3).
    fn invalid_prefilled(&self, rest: &[u8], invalid: Decoded<'_>) -> Tail {
        // Only the bytes before the zeros can hold a record (a JSON payload never ends in a
        // zero byte), so the checks for damage look no further.
        let written = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if written == 0 {
            // Free space the writer zero-filled ahead of its records: the end of the log.
            return Tail::Clean;
        }
        let (incomplete, reason) = match invalid {
            Decoded::Corrupt(reason) => (false, reason),
            _ => (true, "record length runs past the end of the file".to_string()),
        };
        // First, before any guess: a later record proves this one was durable.
        if let Some((at, seq)) = record::durability_proof_follows(&rest[..written], self.next_seq, self.framing) {
            return self.corrupt(format!(
                "{reason}; record {seq} at offset {} was written after this record was durable \
                 (a later flush): damage, not a torn write",
                self.offset + at
            ));
        }
        if self.header.records_durable_lags() {
            // No later flush proves this record durable, so it belongs to the last write,
            // which may not have been: whatever its bytes look like (a sector that never
            // landed, a write cut short, garbage a failed write left), that write is cut from
            // here, and only that write.
            return self.torn(written);
        }
        self.guess_torn_v2(rest, written, incomplete, reason)
    }

    /// Version 2 carries no proof: whether the invalid bytes at the start of `rest` (the
    /// written ones end at `written`) are a torn write is read from their shape.
    fn guess_torn_v2(&self, rest: &[u8], written: usize, incomplete: bool, reason: String) -> Tail {
        let offset = self.offset as u64;
        // Before the length check: a share of the header that never landed reads as a zero
        // length, and a record put back together from the rest is whole.
        if header_share_missing(rest, offset, written, self.next_seq) {
            return self.torn(written);
        }
        if record::length_field_damaged(&rest[..written]) {
            return self
                .corrupt("record length field is damaged (the written bytes are exactly one valid record)".into());
        }
        // A record with a sector that never landed was never covered by an fsync, so nothing
        // after it was acknowledged either: whole records after it are the rest of the same
        // interrupted write (a disk may land its sectors in any order), not history. (A disk
        // that zeroed a whole sector of an acknowledged record would lose the records after it
        // to the cut, copied to quarantine; etcd makes the same call.)
        if sector_missing(rest, offset, written) {
            return self.torn(written);
        }
        if record::valid_record_follows(&rest[..written]) {
            return self.corrupt(format!("{reason}, but valid records follow"));
        }
        if incomplete || cut_short(rest) {
            return self.torn(written);
        }
        self.corrupt(reason)
    }

    /// A version 1 segment (not pre-filled) ends inside a record.
    fn incomplete_unfilled(&self, rest: &[u8]) -> Tail {
        if record::length_field_damaged(rest) {
            return self
                .corrupt("record length field is damaged (the rest of the file is exactly one valid record)".into());
        }
        if record::valid_record_follows(rest) {
            return self.corrupt("record length runs past the end of the file, but valid records follow".into());
        }
        self.torn(rest.len())
    }
}

/// The zero padding at the start of `rest` (at `offset` in a version 3 segment, where a record
/// is expected) before a write that starts at the next sector boundary: zeros up to it, and
/// bytes written in the sector there. Whatever is there is read as the next record (and reported
/// there if it is not one).
fn write_padding(rest: &[u8], offset: u64, framing: Framing) -> Option<usize> {
    let pad = (offset.next_multiple_of(SECTOR_BYTES) - offset) as usize;
    // Something was written in the sector at the boundary (a torn write may have left only
    // some of it, or none of its length field).
    let sector = pad..rest.len().min(pad + SECTOR_BYTES as usize);
    let written_there = rest.get(sector).is_some_and(|there| there.iter().any(|&b| b != 0));
    if pad == 0 || !written_there || rest[..pad].iter().any(|&b| b != 0) {
        return None;
    }
    // With 4 zero bytes or more, `offset` holds a zero length, which no record has. With fewer,
    // a record there whose length starts with zero bytes reads the same: decode it (rare).
    if pad < size_of::<u32>() && matches!(record::decode_framed(rest, framing), Decoded::Record { .. }) {
        return None;
    }
    Some(pad)
}

/// Whether the invalid frame at the start of `rest` (at `offset` in a pre-filled segment) has
/// a sector that never landed. A disk writes a 512-byte sector whole or not at all, and a
/// sector that did not land still reads as the zeros the writer put there; records never hold
/// 512 zero bytes in a row (a payload, a JSON event, holds none). So: a whole sector of the
/// frame, among the bytes written (`..written`), that is all zeros; or, where the frame starts
/// inside a sector, that sector's share of it if it covers at least the record header. A bit
/// flip leaves none of these (after etcd's `isTornEntry`).
fn sector_missing(rest: &[u8], offset: u64, written: usize) -> bool {
    let Ok(header) = RecordHeader::decode(rest) else {
        return false;
    };
    let len = header.payload_len();
    let frame_len = if (1..=record::MAX_PAYLOAD_LEN).contains(&len) { record::HEADER_LEN + len } else { 0 };
    let end = frame_len.max(record::HEADER_LEN).min(written);
    let mut at = 0usize;
    while at < end {
        let sector_end = at + (SECTOR_BYTES - (offset + at as u64) % SECTOR_BYTES) as usize;
        let piece = &rest[at..sector_end.min(written)];
        let whole_sector = (offset + at as u64).is_multiple_of(SECTOR_BYTES);
        if (whole_sector || piece.len() >= record::HEADER_LEN) && piece.iter().all(|&b| b == 0) {
            return true;
        }
        at = sector_end;
    }
    false
}

/// Whether the invalid frame at the start of `rest` (at `offset` in a pre-filled segment)
/// starts less than a record header before a sector boundary, and that sector never landed: its
/// share of the header reads as zeros while the rest of the record did land. Too short for
/// [`sector_missing`] to tell from damage, so the record is put back together instead: with the
/// sequence number it must have (`expected_seq`) and each length at which its payload (a JSON
/// object) could end, one must match what landed of the header, checksum included. And the
/// share must have held at least two set bits, because one bit flip would otherwise read the
/// same (a length or sequence number with a single bit set, that bit flipped). Where the share
/// also holds part of the checksum (13 to 15 bytes), the zero length and sequence number are
/// enough: every record has both nonzero, so one flip cannot zero them.
fn header_share_missing(rest: &[u8], offset: u64, written: usize, expected_seq: u64) -> bool {
    /// Set bits a lost share must have held: one could be a single flipped bit.
    const MIN_LOST_SET_BITS: u32 = 2;
    const SEQ_AT: usize = RecordHeader::SEQ_OFFSET;
    const CRC_AT: usize = RecordHeader::CRC_OFFSET;
    let share = (SECTOR_BYTES - offset % SECTOR_BYTES) as usize;
    if share >= record::HEADER_LEN || written <= record::HEADER_LEN || rest[..share].iter().any(|&b| b != 0) {
        return false;
    }
    if share > CRC_AT {
        return rest[record::HEADER_LEN] == b'{';
    }
    let seq_le = expected_seq.to_le_bytes();
    // What landed of the sequence number must be the expected one's.
    if (share.max(SEQ_AT)..CRC_AT).any(|i| rest[i] != seq_le[i - SEQ_AT]) {
        return false;
    }
    let Ok(RecordHeader { crc, .. }) = RecordHeader::decode(rest) else {
        return false;
    };
    let region = &rest[record::HEADER_LEN..written.min(record::HEADER_LEN + record::MAX_PAYLOAD_LEN)];
    let seq_bits: u32 = seq_le[..share.saturating_sub(SEQ_AT)].iter().map(|b| b.count_ones()).sum();
    // The payload's checksum grows along the candidates; each candidate's header is combined in.
    let mut payload_crc = crc32fast::Hasher::new();
    let mut hashed = 0;
    for end in memchr::memchr_iter(b'}', region) {
        payload_crc.update(&region[hashed..=end]);
        hashed = end + 1;
        // Version 2 only (version 3 never guesses), so the length field holds no lag.
        {
            let len_le = (hashed as u32).to_le_bytes();
            if (share..SEQ_AT).any(|i| rest[i] != len_le[i]) {
                continue;
            }
            let lost_bits: u32 = len_le[..share.min(SEQ_AT)].iter().map(|b| b.count_ones()).sum::<u32>() + seq_bits;
            let mut whole = crc32fast::Hasher::new();
            whole.update(&len_le);
            whole.update(&seq_le);
            whole.combine(&payload_crc);
            if whole.finalize() == crc {
                return lost_bits >= MIN_LOST_SET_BITS;
            }
        }
    }
    false
}

/// Whether the invalid frame at the start of `rest` (whole in the file) was cut short: its
/// payload ends in a zero byte, which a JSON event never does. What a write that landed only
/// up to some byte leaves (only once no whole record follows it).
fn cut_short(rest: &[u8]) -> bool {
    let Ok(header) = RecordHeader::decode(rest) else {
        return false;
    };
    let len = header.payload_len();
    (1..=record::MAX_PAYLOAD_LEN).contains(&len)
        && rest.len() >= record::HEADER_LEN + len
        && rest[record::HEADER_LEN + len - 1] == 0
}

#[cfg(test)]
mod tests {
    //! The guesses of version 2 (sectors that never landed, writes cut short) are tested on
    //! version 2 segments; version 3's proof by durable lags at the end.
    use super::*;

    #[test]
    fn header_round_trips_and_refuses_short_input() {
        let start = chain::chain_next(&chain::GENESIS, 41876, b"{}");
        for version in OLDEST_READABLE_VERSION..=FORMAT_VERSION {
            let h = Header { first_seq: 41877, version, chain_start: (version >= 4).then_some(start) };
            let mut raw = vec![0; h.records_offset()];
            h.encode_into(&mut raw);
            assert_eq!(Header::decode(&raw), Ok(h));
            assert_eq!(&raw[..MAGIC.len()], MAGIC);
        }
        let raw = encode_header(7, &start);
        for cut in 0..HEADER_LEN {
            let expected = if cut < BASE_HEADER_LEN { BASE_HEADER_LEN } else { HEADER_LEN };
            assert_eq!(Header::decode(&raw[..cut]), Err(format!("segment header is {cut} bytes, expected {expected}")));
        }
        // The chain start is checksummed, and that checksum by the header's.
        for byte in Header::CHAIN_CRC_OFFSET..HEADER_LEN {
            let mut b = raw;
            b[byte] ^= 1;
            assert!(Header::decode(&b).is_err(), "byte {byte}");
        }
    }

    fn segment(n: u64) -> Vec<u8> {
        let mut b = encode_header_version(1, 2).to_vec();
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

    /// A pre-filled segment: `n` records, then zeros up to `len` bytes.
    fn prefilled(n: u64, len: usize) -> (Vec<u8>, Vec<usize>) {
        let mut b = encode_header_version(1, 2).to_vec();
        let mut ends = vec![b.len()];
        for seq in 1..=n {
            let payload = format!("{{\"event\":{seq},\"pad\":\"{}\"}}", "x".repeat((seq as usize * 97) % 700));
            record::encode(seq, payload.as_bytes(), &mut b);
            ends.push(b.len());
        }
        assert!(b.len() <= len);
        b.resize(len, 0);
        (b, ends)
    }

    /// The sectors of a pre-filled file that overlap `start..end`, by their offsets.
    fn sectors_of(start: usize, end: usize) -> Vec<usize> {
        (0..end).step_by(SECTOR_BYTES as usize).filter(|&s| s + SECTOR_BYTES as usize > start).collect()
    }

    /// `full` with the bytes of `start..end` zeroed in each of `sectors` whose bit in `landed`
    /// is clear: what power loss leaves of a write of `start..end` over zeros.
    fn land(full: &[u8], start: usize, end: usize, sectors: &[usize], landed: u32) -> Vec<u8> {
        let mut b = full.to_vec();
        for (i, &sector) in sectors.iter().enumerate() {
            if landed & (1 << i) == 0 {
                b[sector.max(start)..(sector + SECTOR_BYTES as usize).min(end)].fill(0);
            }
        }
        b
    }

    fn records_before(ends: &[usize], at: usize) -> u64 {
        ends.iter().filter(|&&e| e <= at).count() as u64 - 1
    }

    #[test]
    fn zeros_after_the_last_record_are_free_space() {
        let (b, ends) = prefilled(6, 8192);
        let s = scan(Path::new("x.wal"), &b, 1, &mut |_, _| Ok(true));
        assert_eq!((s.tail, s.valid_len, s.next_seq, s.version), (Tail::Clean, *ends.last().unwrap() as u64, 7, 2));
        // A version 1 segment reads zeros at its end as a torn write.
        let mut v1 = b.clone();
        v1[..BASE_HEADER_LEN].copy_from_slice(&encode_header_version(1, 1));
        let s = scan(Path::new("x.wal"), &v1, 1, &mut |_, _| Ok(true));
        assert!(matches!(s.tail, Tail::Torn { .. }), "{:?}", s.tail);
    }

    #[test]
    fn a_write_torn_in_place_is_torn_at_any_byte() {
        // Power loss while the last records were written over the zeros: a prefix of them
        // landed, byte by byte.
        let (full, ends) = prefilled(6, 8192);
        let durable = ends[3];
        for cut in durable..=*ends.last().unwrap() {
            let mut b = full.clone();
            b[cut..].iter_mut().for_each(|x| *x = 0);
            let (n, tail) = count(&b);
            assert_eq!(n, records_before(&ends, cut), "cut {cut}");
            match tail {
                Tail::Clean => assert!(ends.contains(&cut), "cut {cut}: clean inside a record"),
                Tail::Torn { offset, len } => {
                    assert_eq!(offset as usize, ends[n as usize], "cut {cut}");
                    assert!(offset + len <= cut as u64, "cut {cut}: the torn bytes end where the writes did");
                }
                Tail::Corrupt(d) => panic!("cut {cut}: {d}"),
            }
        }
    }

    #[test]
    fn a_write_torn_by_sectors_is_torn() {
        // A disk that wrote some sectors of the last write and not others: every pattern of
        // the sectors of the last record, the later ones all missing.
        let (full, ends) = prefilled(6, 8192);
        let (start, end) = (ends[5], ends[6]);
        let sectors = sectors_of(start, end);
        assert!(sectors.len() >= 2, "the last record spans sectors");
        for mask in 0..(1u32 << sectors.len()) - 1 {
            let (n, tail) = count(&land(&full, start, end, &sectors, mask));
            assert_eq!(n, 5, "mask {mask:b}");
            if mask == 0 {
                assert_eq!(tail, Tail::Clean, "nothing of the write landed");
            } else {
                assert!(
                    matches!(tail, Tail::Torn { offset, .. } if offset as usize == start),
                    "mask {mask:b}: {tail:?}"
                );
            }
        }
    }

    #[test]
    fn a_batch_write_torn_by_sectors_out_of_order_is_torn() {
        // One write of several records (a combined batch) over the zeros; power loss lands any
        // set of its sectors. Whatever landed, the records before the first one that did not
        // are read and the rest is a torn tail, even where whole records landed after it.
        let (full, ends) = prefilled(6, 8192);
        let (start, end) = (ends[2], ends[6]);
        let sectors = sectors_of(start, end);
        assert!(sectors.len() >= 4, "the batch spans sectors");
        for mask in 0..(1u32 << sectors.len()) {
            let b = land(&full, start, end, &sectors, mask);
            // The records wholly inside landed sectors, up to the first one that is not.
            let landed =
                |at: usize| sectors.iter().position(|&s| s <= at && at < s + 512).is_none_or(|i| mask & (1 << i) != 0);
            let whole = (2..6).take_while(|&r| (ends[r]..ends[r + 1]).all(landed)).count() as u64;
            let (n, tail) = count(&b);
            assert_eq!(n, 2 + whole, "mask {mask:b}");
            match tail {
                Tail::Clean => assert!(b[ends[n as usize]..].iter().all(|&x| x == 0), "mask {mask:b}"),
                Tail::Torn { offset, .. } => assert_eq!(offset as usize, ends[n as usize], "mask {mask:b}"),
                Tail::Corrupt(d) => panic!("mask {mask:b}: {d}"),
            }
        }
    }

    /// A segment whose record 2 starts `share` bytes before the end of sector 1, with record 3
    /// after it (one write of both), zeros to 4096; and where record 2 starts.
    fn straddling(share: usize, payload2_len: usize) -> (Vec<u8>, usize) {
        let mut b = encode_header_version(1, 2).to_vec();
        let start2 = 2 * SECTOR_BYTES as usize - share;
        let pad1 = start2 - b.len() - record::HEADER_LEN - r#"{"pad":""}"#.len();
        record::encode(1, format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad1)).as_bytes(), &mut b);
        assert_eq!(b.len(), start2);
        let pad2 = payload2_len - r#"{"event":2,"pad":""}"#.len();
        record::encode(2, format!(r#"{{"event":2,"pad":"{}"}}"#, "y".repeat(pad2)).as_bytes(), &mut b);
        record::encode(3, br#"{"event":3}"#, &mut b);
        b.resize(4096, 0);
        (b, start2)
    }

    #[test]
    fn a_record_whose_header_straddles_a_sector_that_never_landed_is_torn() {
        for share in 1..record::HEADER_LEN {
            let (full, start2) = straddling(share, 620);
            assert_eq!(count(&full), (3, Tail::Clean));
            // The sector holding the share never landed: it still holds record 1's end (written
            // and fsynced before) and zeros.
            let mut b = full.clone();
            b[start2..2 * SECTOR_BYTES as usize].fill(0);
            let (n, tail) = count(&b);
            assert_eq!(n, 1, "share {share}");
            assert!(matches!(tail, Tail::Torn { offset, .. } if offset as usize == start2), "share {share}: {tail:?}");
        }
    }

    #[test]
    fn one_flip_that_zeroes_a_header_share_is_damage() {
        // A payload of 512 bytes has a length with one set bit; with a share of 4 bytes (the
        // length alone) flipping it reads exactly like a lost share, so it stays damage.
        let (full, start2) = straddling(4, 512);
        let mut b = full.clone();
        b[start2 + 1] ^= 0b10;
        assert!(b[start2..start2 + 4].iter().all(|&x| x == 0));
        let (n, tail) = count(&b);
        assert_eq!(n, 1);
        assert!(matches!(tail, Tail::Corrupt(_)), "{tail:?}");
        // Every single flip in records 2 and 3 of a straddling layout is damage.
        for share in [1, 3, 4, 5, 8, 12, 13, 15] {
            let (full, start2) = straddling(share, 620);
            let end = full.iter().rposition(|&x| x != 0).unwrap() + 1;
            for bit in (start2 * 8)..(end * 8) {
                let mut b = full.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let (_, tail) = count(&b);
                assert!(matches!(tail, Tail::Corrupt(_)), "share {share}, bit {bit}: {tail:?}");
            }
        }
    }

    #[test]
    fn bit_flips_in_a_prefilled_segment_are_damage() {
        let (full, ends) = prefilled(4, 4096);
        let records_end = *ends.last().unwrap();
        for bit in 0..(records_end * 8) {
            let mut b = full.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let (n, tail) = count(&b);
            assert!(n < 4, "bit {bit}: all records still read");
            assert!(matches!(tail, Tail::Corrupt(_)), "bit {bit}: {tail:?}");
        }
        // In the free space, a flip loses nothing and is never read as a clean end.
        for bit in (records_end * 8..full.len() * 8).step_by(7) {
            let mut b = full.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let (n, tail) = count(&b);
            assert_eq!(n, 4, "bit {bit}");
            assert!(!matches!(tail, Tail::Clean), "bit {bit}");
        }
    }

    #[test]
    fn a_segment_torn_while_being_created_is_torn() {
        for start in [chain::GENESIS, chain::chain_next(&chain::GENESIS, 1, b"{}")] {
            let header = encode_header(1, &start);
            for landed in 0..HEADER_LEN {
                let mut b = vec![0u8; 4096];
                b[..landed].copy_from_slice(&header[..landed]);
                if Header::decode(&b).is_ok() {
                    // The genesis value is zeros: the header was whole already.
                    assert!(start == chain::GENESIS && landed >= BASE_HEADER_LEN);
                    continue;
                }
                let s = scan(Path::new("x.wal"), &b, 1, &mut |_, _| Ok(true));
                assert!(matches!(s.tail, Tail::Torn { offset: 0, .. }), "{landed}: {:?}", s.tail);
            }
        }
        let header = encode_header(1, &chain::GENESIS);
        let mut b = vec![0u8; 4096];
        b[..HEADER_LEN].copy_from_slice(&header);
        b[Header::VERSION_OFFSET] = 9; // a version from the future, with the checksum to match
        let crc = crc32fast::hash(&b[..Header::CRC_OFFSET]);
        b[Header::CRC_OFFSET..Header::LEN].copy_from_slice(&crc.to_le_bytes());
        let s = scan(Path::new("x.wal"), &b, 1, &mut |_, _| Ok(true));
        assert!(matches!(&s.tail, Tail::Corrupt(d) if d.reason.contains("version 9")), "{:?}", s.tail);
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

    /// A version 3 segment of `flushes` writes of `per_flush` records each, every write's first
    /// record flagged; returns the bytes (zeros after the records) and each record's
    /// (start, end, seq).
    fn v3_segment(flushes: u64, per_flush: u64) -> (Vec<u8>, Vec<(usize, usize, u64)>) {
        let mut b = encode_header_version(1, 3);
        let mut bounds = Vec::new();
        let mut seq = 1;
        for _ in 0..flushes {
            // Each write starts at a sector, as the writer lays them out (but the first, right
            // after the header).
            if b.len() > BASE_HEADER_LEN {
                b.resize(b.len().next_multiple_of(SECTOR_BYTES as usize), 0);
            }
            for i in 0..per_flush {
                let start = b.len();
                let pad = "x".repeat((seq as usize * 37) % 300);
                record::encode(seq, format!(r#"{{"event":{seq},"pad":"{pad}"}}"#).as_bytes(), &mut b);
                if i == 0 {
                    // The first record of each write: everything before it was durable.
                    record::set_durable_lags(&mut b[start..], seq - 1);
                } else {
                    // The others: the same durable point, so a larger lag.
                    record::set_durable_lags(&mut b[start..], seq - 1 - i);
                }
                bounds.push((start, b.len(), seq));
                seq += 1;
            }
        }
        b.resize(b.len() + 2048, 0);
        (b, bounds)
    }

    /// Version 3: damage that a later write's durable lag proves durable is damage whatever it looks
    /// like; damage in the last write is a torn tail cut at the damaged record, whatever it
    /// looks like. Every byte of every record, zeroed and flipped.
    #[test]
    fn v3_damage_is_torn_only_in_the_last_write() {
        let (b, bounds) = v3_segment(4, 3);
        let last_write_start = bounds[bounds.len() - 3].0;
        for &(start, end, seq) in &bounds {
            for at in start..end {
                for edit in [0u8, 0xff] {
                    let mut d = b.clone();
                    if edit == 0 {
                        if d[at] == 0 {
                            continue;
                        }
                        d[at] = 0;
                    } else {
                        d[at] ^= 0xff;
                    }
                    let (n, tail) = count(&d);
                    if start >= last_write_start {
                        assert_eq!(n, seq - 1, "byte {at} of record {seq} ({edit:#x})");
                        assert!(matches!(tail, Tail::Torn { offset, .. } if offset == start as u64), "{tail:?}");
                    } else {
                        assert!(
                            matches!(&tail, Tail::Corrupt(d) if d.offset == start as u64 && d.seq == seq
                                && d.reason.contains("later flush")),
                            "byte {at} of record {seq} ({edit:#x}): {tail:?}"
                        );
                    }
                }
            }
        }
    }

    /// Version 3: a whole sector zeroed anywhere among the records.
    #[test]
    fn v3_a_zeroed_sector_before_the_last_write_is_damage() {
        let (b, bounds) = v3_segment(6, 2);
        let records_end = bounds.last().unwrap().1;
        let last_write_start = bounds[bounds.len() - 2].0;
        let mut sector = 0;
        while sector < records_end {
            let mut d = b.clone();
            let from = sector.max(BASE_HEADER_LEN);
            d[from..sector + SECTOR_BYTES as usize].fill(0);
            let Some(hit) = bounds.iter().find(|r| r.1 > from && r.0 < sector + SECTOR_BYTES as usize) else {
                // Only padding in this sector.
                assert_eq!(count(&d), count(&b), "padding zeroed at {sector}");
                sector += SECTOR_BYTES as usize;
                continue;
            };
            let (n, tail) = count(&d);
            if hit.0 >= last_write_start {
                // The last write, torn (or, all of it in the sector, never landed).
                assert!(matches!(tail, Tail::Torn { .. } | Tail::Clean), "sector at {sector}: {tail:?}");
                assert_eq!(n, hit.2 - 1);
            } else {
                assert!(matches!(&tail, Tail::Corrupt(d) if d.seq == hit.2), "sector at {sector}: {tail:?}");
            }
            sector += SECTOR_BYTES as usize;
        }
    }

    /// A record of exactly `payload_len` bytes with sequence number `seq`, durable lag `lag`.
    fn record_of(seq: u64, payload_len: usize, lag: u64) -> Vec<u8> {
        let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(payload_len - 10));
        let mut b = Vec::new();
        record::encode(seq, payload.as_bytes(), &mut b);
        record::set_durable_lags(&mut b, seq - lag);
        b
    }

    /// Padding of 1 to 3 bytes (a write that ended just before a sector boundary) is padding;
    /// a record there whose length starts with a zero byte (a payload of 256 bytes) is a
    /// record, not padding.
    #[test]
    fn v3_padding_shorter_than_a_length_field() {
        for pad in 1..=4usize {
            let mut b = encode_header_version(1, 3);
            b.extend(record_of(1, 100, 1));
            let first_end = SECTOR_BYTES as usize - pad;
            b.extend(record_of(2, first_end - b.len() - record::HEADER_LEN, 1));
            assert_eq!(b.len(), first_end);
            b.resize(SECTOR_BYTES as usize, 0);
            b.extend(record_of(3, 200, 1));
            b.resize(4096, 0);
            assert_eq!(count(&b), (3, Tail::Clean), "padding of {pad} bytes");
        }
        // No padding: record 3 right after record 2, its length field starting with zero bytes.
        let mut b = encode_header_version(1, 3);
        b.extend(record_of(1, 100, 1));
        b.extend(record_of(2, SECTOR_BYTES as usize - 1 - b.len() - record::HEADER_LEN, 1));
        let r3 = record_of(3, 256, 2);
        assert_eq!(r3[0], 0, "the length field starts with a zero byte");
        b.extend(r3);
        b.resize(4096, 0);
        assert_eq!(count(&b), (3, Tail::Clean));
    }

    /// A version 4 segment starting at `first` after `start`: `n` chained records, zeros after.
    fn v4_segment(first: u64, n: u64, start: ChainValue) -> (Vec<u8>, Vec<(usize, usize)>, ChainValue) {
        let mut b = encode_header(first, &start).to_vec();
        let mut chain = start;
        let mut bounds = Vec::new();
        for seq in first..first + n {
            let at = b.len();
            let pad = "x".repeat((seq as usize * 37) % 200);
            record::encode_chained(seq, format!(r#"{{"event":{seq},"pad":"{pad}"}}"#).as_bytes(), &mut chain, &mut b);
            bounds.push((at, b.len()));
        }
        b.resize(b.len() + 1024, 0);
        (b, bounds, chain)
    }

    /// Recomputes the checksum of the chained record at the start of `frame` over what it holds.
    fn fix_crc(frame: &mut [u8]) {
        let h = RecordHeader::decode(frame).unwrap();
        let end = record::CHAINED_OVERHEAD + h.payload_len();
        let crc = record::checksum_framed(h.len_field, h.seq, &frame[16..48], &frame[48..end]);
        frame[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    fn scan_v4(b: &[u8], first: u64, verify_chain: bool) -> Scan {
        let start = ScanStart { verify_chain, ..ScanStart::default() };
        scan_from(Path::new("x.wal"), b, first, start, &mut |_, _| Ok(true))
    }

    #[test]
    fn v4_chains_from_its_header() {
        let start = chain::chain_next(&chain::GENESIS, 9, b"{}");
        let (b, bounds, head) = v4_segment(10, 5, start);
        let s = scan_v4(&b, 10, true);
        assert_eq!((s.tail, s.next_seq, s.chain_start, s.chain), (Tail::Clean, 15, Some(start), Some(head)));
        assert_eq!(s.valid_len, bounds.last().unwrap().1 as u64);
        // A record's payload rewritten and its checksum made good by hand: the CRC passes, the
        // chain does not.
        let (at, _) = bounds[2];
        let mut forged = b.clone();
        forged[at + record::CHAINED_OVERHEAD + 2] = b'X';
        fix_crc(&mut forged[at..]);
        assert_eq!(scan_v4(&forged, 10, false).tail, Tail::Clean, "without the chain check it reads");
        let s = scan_v4(&forged, 10, true);
        assert!(
            matches!(&s.tail, Tail::Corrupt(d) if d.seq == 12 && d.offset == at as u64 && d.reason.contains("chain")),
            "{:?}",
            s.tail
        );
        // Every single-byte flip of the records is found (by the CRC).
        for at in (HEADER_LEN..bounds.last().unwrap().1).step_by(3) {
            let mut d = b.clone();
            d[at] ^= 0x20;
            assert!(!matches!(scan_v4(&d, 10, true).tail, Tail::Clean), "byte {at}");
        }
        // A truncation is a torn tail (or a clean end at a record boundary), never damage.
        for cut in HEADER_LEN..bounds.last().unwrap().1 {
            let t = scan_v4(&b[..cut], 10, true).tail;
            assert!(matches!(t, Tail::Clean | Tail::Torn { .. }), "cut {cut}: {t:?}");
        }
    }

    #[test]
    fn v4_scan_resumes_mid_segment_with_the_chain() {
        let (b, bounds, head) = v4_segment(1, 4, chain::GENESIS);
        let Decoded::Record { chain, .. } = record::decode_framed(&b[bounds[1].0..], Framing::Chained) else {
            panic!()
        };
        let start = ScanStart { offset: bounds[2].0 as u64, seq: 3, chain, verify_chain: true };
        let s = scan_from(Path::new("x.wal"), &b, 1, start, &mut |_, _| Ok(true));
        assert_eq!((s.tail, s.next_seq, s.chain), (Tail::Clean, 5, Some(head)));
        let wrong = ScanStart { chain: Some(ChainValue([1; 32])), ..start };
        let s = scan_from(Path::new("x.wal"), &b, 1, wrong, &mut |_, _| Ok(true));
        assert!(matches!(s.tail, Tail::Corrupt(ref d) if d.seq == 3), "{:?}", s.tail);
    }
}
