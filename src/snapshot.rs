//! Snapshots: the folded state at a sequence number, so that opening replays only the tail.
//!
//! ```text
//! | magic "ALLOCSNP" | version: u32 LE | flags: u32 LE (0) | seq: u64 LE | payload_len: u64 LE | reserved: u32 (0) | crc: u32 LE | payload |
//! ```
//!
//! `crc` covers the 36 header bytes before it and the payload. Files are named
//! `<seq:020>.snap` and written atomically. Version 3 (written now) has a binary payload:
//!
//! ```text
//! | meta_len: u64 LE | meta: JSON (everything but the allocations, plus the log position) |
//! | count: u64 LE | count allocations, each in the binary layout of `put_allocation` |
//! ```
//!
//! Version 2 (still read) has the JSON of [`StateData`] as its payload. `docs/format.md`
//! describes both.

use crate::event::{McpGrant, WorkerGrant};
use crate::model::{AllocationId, AllocationState, Metadata, Priority, Resources};
use crate::state::{Allocation, State, StateData, StateLoader};
use crate::storage::{write_atomic, Storage};
use crate::wal::LogPosition;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"ALLOCSNP";
/// 2: allocations carry `ended_seq` and the state records how many ended ones were evicted.
/// 3: binary allocations after a JSON meta part that also records the log position.
pub const FORMAT_VERSION: u32 = 3;
/// Oldest version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 40;
pub const EXTENSION: &str = "snap";
/// Limits on what one decoded allocation may claim, so damaged counts fail fast instead of
/// allocating wildly (CRC makes this nearly impossible; a crafted file is the remaining case).
const MAX_LIST_ITEMS: u32 = 1 << 20;

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

/// The JSON part of a v3 snapshot.
#[derive(Serialize)]
struct MetaOut<'a> {
    ledger_id: &'a str,
    created_us: i64,
    config: &'a crate::config::Config,
    last_seq: u64,
    last_ts_us: i64,
    evicted: u64,
    assigned_mcp_endpoints: &'a BTreeMap<String, String>,
    assigned_mcp_count: u64,
    log_position: Option<LogPosition>,
}

#[derive(Deserialize)]
struct MetaIn {
    ledger_id: String,
    created_us: i64,
    config: crate::config::Config,
    last_seq: u64,
    last_ts_us: i64,
    evicted: u64,
    assigned_mcp_endpoints: BTreeMap<String, String>,
    assigned_mcp_count: u64,
    #[serde(default)]
    log_position: Option<LogPosition>,
}

pub fn encode(state: &StateData) -> Vec<u8> {
    encode_with_position(state, None)
}

/// A v3 snapshot; `position` is where the record `state.last_seq` sits in the log, so opening
/// can resume reading right after it (a position for another record makes the file invalid).
pub fn encode_with_position(state: &StateData, position: Option<LogPosition>) -> Vec<u8> {
    let meta = serde_json::to_vec(&MetaOut {
        ledger_id: &state.ledger_id,
        created_us: state.created_us,
        config: &state.config,
        last_seq: state.last_seq,
        last_ts_us: state.last_ts_us,
        evicted: state.evicted,
        assigned_mcp_endpoints: &state.assigned_mcp_endpoints,
        assigned_mcp_count: state.assigned_mcp_count,
        log_position: position,
    })
    .expect("snapshot meta serializes");
    let mut payload = Vec::with_capacity(64 + meta.len() + state.allocations.len() * 256);
    payload.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    payload.extend_from_slice(&meta);
    payload.extend_from_slice(&(state.allocations.len() as u64).to_le_bytes());
    for a in &state.allocations {
        put_allocation(&mut payload, a);
    }
    frame(FORMAT_VERSION, state.last_seq, &payload)
}

/// The v2 (JSON) encoding, kept so tests can write what older builds wrote.
pub fn encode_v2(state: &StateData) -> Vec<u8> {
    frame(2, state.last_seq, &serde_json::to_vec(state).expect("state serializes"))
}

fn frame(version: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..36]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks and loads a snapshot; `expected_seq` comes from the file name.
pub fn decode(bytes: &[u8], expected_seq: u64) -> Result<State, String> {
    decode_with_position(bytes, expected_seq).map(|(s, _)| s)
}

/// Like [`decode`], also returning the log position the snapshot recorded (v3 only).
pub fn decode_with_position(bytes: &[u8], expected_seq: u64) -> Result<(State, Option<LogPosition>), String> {
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
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "snapshot format version {version} is not supported (this build reads {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
        ));
    }
    if seq != expected_seq {
        return Err(format!("snapshot header says sequence number {seq}, its name says {expected_seq}"));
    }
    if version == 2 {
        let data: StateData =
            serde_json::from_slice(payload).map_err(|e| format!("snapshot payload does not decode: {e}"))?;
        if data.last_seq != seq {
            return Err("snapshot payload disagrees with its header".into());
        }
        let state = State::from_data(data).map_err(|e| format!("snapshot state is inconsistent: {e}"))?;
        return Ok((state, None));
    }
    decode_v3_payload(payload, seq)
}

fn decode_v3_payload(payload: &[u8], seq: u64) -> Result<(State, Option<LogPosition>), String> {
    let mut r = Reader { bytes: payload, at: 0 };
    let meta_len = r.u64()?;
    let meta_bytes = r.take(usize::try_from(meta_len).map_err(|_| "meta length overflows")?)?;
    let meta: MetaIn = serde_json::from_slice(meta_bytes).map_err(|e| format!("snapshot meta does not decode: {e}"))?;
    if meta.last_seq != seq || meta.log_position.is_some_and(|p| p.seq != seq) {
        return Err("snapshot payload disagrees with its header".into());
    }
    let count = r.u64()?;
    // Each allocation takes at least 60 bytes, so a count beyond that is damage.
    if count > (payload.len() / 60) as u64 {
        return Err(format!("snapshot claims {count} allocations, more than its {} bytes can hold", payload.len()));
    }
    let data = StateData {
        ledger_id: meta.ledger_id,
        created_us: meta.created_us,
        config: meta.config,
        last_seq: meta.last_seq,
        last_ts_us: meta.last_ts_us,
        allocations: Vec::new(),
        evicted: meta.evicted,
        assigned_mcp_endpoints: meta.assigned_mcp_endpoints,
        assigned_mcp_count: meta.assigned_mcp_count,
    };
    let inconsistent = |e: String| format!("snapshot state is inconsistent: {e}");
    let mut loader = StateLoader::new(data, count as usize).map_err(inconsistent)?;
    for i in 0..count {
        let a = get_allocation(&mut r).map_err(|e| format!("allocation {i} at byte {}: {e}", r.at))?;
        loader.add(a).map_err(inconsistent)?;
    }
    if r.at != payload.len() {
        return Err(format!("{} bytes follow the last allocation", payload.len() - r.at));
    }
    Ok((loader.finish().map_err(inconsistent)?, meta.log_position))
}

// ----- the binary allocation layout (all integers little-endian) -----
//
// id u64 | job_id str | priority u8 | state u8 | flags u8 (1: ended_us, 2: ended_seq, 4: error)
// | ttl_seconds u64 | created_us i64 | deadline_us i64 | [ended_us i64] | [ended_seq u64]
// | resources: cpu_millicores u64, memory_mib u64, workers u32
// | workers: count u32, each: slot u32, worker_id str, endpoint str, cpu_millicores u64, memory_mib u64
// | mcp_servers: count u32, each: name str, endpoint str, cpu_millicores u64, memory_mib u64,
//   flags u8 (1: assigned, 2: started)
// | metadata str (compact JSON object, empty for none) | [error str]
//
// str = len u32 + UTF-8 bytes.

const FLAG_ENDED_US: u8 = 1;
const FLAG_ENDED_SEQ: u8 = 2;
const FLAG_ERROR: u8 = 4;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn priority_code(p: Priority) -> u8 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

fn state_code(s: AllocationState) -> u8 {
    match s {
        AllocationState::Active => 0,
        AllocationState::Released => 1,
        AllocationState::Expired => 2,
        AllocationState::Failed => 3,
    }
}

fn put_allocation(out: &mut Vec<u8>, a: &Allocation) {
    out.extend_from_slice(&a.id.as_u64().to_le_bytes());
    put_str(out, &a.job_id);
    out.push(priority_code(a.priority));
    out.push(state_code(a.state));
    let flags = if a.ended_us.is_some() { FLAG_ENDED_US } else { 0 }
        | if a.ended_seq.is_some() { FLAG_ENDED_SEQ } else { 0 }
        | if a.error.is_some() { FLAG_ERROR } else { 0 };
    out.push(flags);
    out.extend_from_slice(&a.ttl_seconds.to_le_bytes());
    out.extend_from_slice(&a.created_us.to_le_bytes());
    out.extend_from_slice(&a.deadline_us.to_le_bytes());
    if let Some(t) = a.ended_us {
        out.extend_from_slice(&t.to_le_bytes());
    }
    if let Some(s) = a.ended_seq {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(&a.resources.cpu_millicores.to_le_bytes());
    out.extend_from_slice(&a.resources.memory_mib.to_le_bytes());
    out.extend_from_slice(&a.resources.workers.to_le_bytes());
    out.extend_from_slice(&(a.workers.len() as u32).to_le_bytes());
    for w in &a.workers {
        out.extend_from_slice(&w.slot.to_le_bytes());
        put_str(out, &w.worker_id);
        put_str(out, &w.endpoint);
        out.extend_from_slice(&w.cpu_millicores.to_le_bytes());
        out.extend_from_slice(&w.memory_mib.to_le_bytes());
    }
    out.extend_from_slice(&(a.mcp_servers.len() as u32).to_le_bytes());
    for m in &a.mcp_servers {
        put_str(out, &m.name);
        put_str(out, &m.endpoint);
        out.extend_from_slice(&m.cpu_millicores.to_le_bytes());
        out.extend_from_slice(&m.memory_mib.to_le_bytes());
        out.push(u8::from(m.assigned) | (u8::from(m.started) << 1));
    }
    put_str(out, if a.metadata.is_empty() { "" } else { a.metadata.as_json() });
    if let Some(e) = &a.error {
        put_str(out, e);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<&'a str, String> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|e| format!("invalid UTF-8: {e}"))
    }
    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u32()?;
        if n > MAX_LIST_ITEMS {
            return Err(format!("{n} {what} is beyond the limit of {MAX_LIST_ITEMS}"));
        }
        Ok(n as usize)
    }
}

fn get_allocation(r: &mut Reader<'_>) -> Result<Allocation, String> {
    let id = AllocationId::from_u64(r.u64()?);
    let job_id = r.str()?.to_owned();
    let priority = match r.u8()? {
        0 => Priority::Low,
        1 => Priority::Normal,
        2 => Priority::High,
        3 => Priority::Critical,
        other => return Err(format!("priority code {other} (allowed: 0 to 3)")),
    };
    let state = match r.u8()? {
        0 => AllocationState::Active,
        1 => AllocationState::Released,
        2 => AllocationState::Expired,
        3 => AllocationState::Failed,
        other => return Err(format!("state code {other} (allowed: 0 to 3)")),
    };
    let flags = r.u8()?;
    if flags & !(FLAG_ENDED_US | FLAG_ENDED_SEQ | FLAG_ERROR) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let ttl_seconds = r.u64()?;
    let created_us = r.i64()?;
    let deadline_us = r.i64()?;
    let ended_us = if flags & FLAG_ENDED_US != 0 { Some(r.i64()?) } else { None };
    let ended_seq = if flags & FLAG_ENDED_SEQ != 0 { Some(r.u64()?) } else { None };
    let resources = Resources { cpu_millicores: r.u64()?, memory_mib: r.u64()?, workers: r.u32()? };
    let n = r.count("workers")?;
    let mut workers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        workers.push(WorkerGrant {
            slot: r.u32()?,
            worker_id: r.str()?.to_owned(),
            endpoint: r.str()?.to_owned(),
            cpu_millicores: r.u64()?,
            memory_mib: r.u64()?,
        });
    }
    let n = r.count("MCP servers")?;
    let mut mcp_servers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let name = r.str()?.to_owned();
        let endpoint = r.str()?.to_owned();
        let (cpu_millicores, memory_mib) = (r.u64()?, r.u64()?);
        let f = r.u8()?;
        if f & !3 != 0 {
            return Err(format!("unknown MCP server flags {f:#x}"));
        }
        mcp_servers.push(McpGrant {
            name,
            endpoint,
            cpu_millicores,
            memory_mib,
            assigned: f & 1 != 0,
            started: f & 2 != 0,
        });
    }
    let metadata = match r.str()? {
        "" => Metadata::default(),
        text => Metadata::from_json_text(text.to_owned())?,
    };
    let error = if flags & FLAG_ERROR != 0 { Some(r.str()?.to_owned()) } else { None };
    Ok(Allocation {
        id,
        job_id,
        priority,
        state,
        ttl_seconds,
        created_us,
        deadline_us,
        ended_us,
        ended_seq,
        workers,
        mcp_servers,
        resources,
        metadata,
        error,
    })
}

pub fn write(
    storage: &dyn Storage,
    dir: &Path,
    state: &StateData,
    position: Option<LogPosition>,
) -> std::io::Result<PathBuf> {
    storage.create_dir_all(dir)?;
    let path = dir.join(file_name(state.last_seq));
    write_atomic(storage, &path, &encode_with_position(state, position))?;
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
