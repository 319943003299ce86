//! The log room: bytes and files. Record framing and checksums ([`record`]), segment files
//! ([`segment`]), the write-ahead log (writer, scans, tail repair: [`wal`]), snapshot files
//! ([`snapshot`]), the directory layout ([`layout`]) and the storage every file operation goes
//! through ([`storage`]: real files, memory, and for tests the fault-injecting double). Each
//! on-disk header is a type with named field offsets, checked at compile time against
//! `docs/format.md` ([`fields`] reads and writes them). Nothing here knows what an allocation
//! is beyond the types it encodes.

pub mod backend;
pub mod chain;
pub mod fields;
pub mod follow;
pub mod layout;
pub mod reader;
pub mod record;
pub mod segment;
pub mod snapshot;
pub mod storage;
pub mod wal;
