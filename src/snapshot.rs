//! Snapshots: the folded state at a sequence number, so that opening replays only the tail.
//!
//! ```text
//! | magic "ALLOCSNP" | version: u32 LE | flags: u32 LE (0) | seq: u64 LE | payload_len: u64 LE | reserved: u32 (0) | crc: u32 LE | payload |
//! ```
//!
//! The payload is the JSON of [`StateData`]; `crc` covers the 36 header bytes before it and
//! the payload. Files are named `<seq:020>.snap` and written atomically.

use crate::state::{State, StateData};
use crate::storage::{write_atomic, Storage};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"ALLOCSNP";
/// 2: allocations carry `ended_seq` and the state records how many ended ones were evicted.
pub const FORMAT_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 40;
pub const EXTENSION: &str = "snap";

pub fn file_name(seq: u64) -> String {
    format!("{seq:020}.{EXTENSION}")
}

pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".snap")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub fn encode(state: &StateData) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("state serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&state.last_seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..36]);
    h.update(&payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks and loads a snapshot; `expected_seq` comes from the file name.
pub fn decode(bytes: &[u8], expected_seq: u64) -> Result<State, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("snapshot is {} bytes, shorter than its header", bytes.len()));
    }
    if &bytes[0..8] != MAGIC {
        return Err("not a snapshot file (bad magic)".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let seq = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    let stored = u32::from_le_bytes(bytes[36..40].try_into().unwrap());
    if len != (bytes.len() - HEADER_LEN) as u64 {
        return Err(format!("snapshot payload should be {len} bytes, file holds {}", bytes.len() - HEADER_LEN));
    }
    let payload = &bytes[HEADER_LEN..];
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..36]);
    h.update(payload);
    if h.finalize() != stored {
        return Err("snapshot checksum mismatch".into());
    }
    if version != FORMAT_VERSION {
        return Err(format!("snapshot format version {version} is not supported (this build reads {FORMAT_VERSION})"));
    }
    if seq != expected_seq {
        return Err(format!("snapshot header says sequence number {seq}, its name says {expected_seq}"));
    }
    let data: StateData =
        serde_json::from_slice(payload).map_err(|e| format!("snapshot payload does not decode: {e}"))?;
    if data.last_seq != seq {
        return Err("snapshot payload disagrees with its header".into());
    }
    State::from_data(data).map_err(|e| format!("snapshot state is inconsistent: {e}"))
}

pub fn write(storage: &dyn Storage, dir: &Path, state: &StateData) -> std::io::Result<PathBuf> {
    storage.create_dir_all(dir)?;
    let path = dir.join(file_name(state.last_seq));
    write_atomic(storage, &path, &encode(state))?;
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
    use crate::config::Config;

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
}
