//! The log room: bytes and files. Record framing and checksums, segment files, the storage
//! trait (real files and the fault-injecting double), the write-ahead log (writer, scans,
//! tail repair) and snapshot files. Nothing here knows what an allocation is beyond the types
//! it encodes.

pub mod layout;
pub mod reader;
pub mod record;
pub mod segment;
pub mod snapshot;
pub mod storage;
pub mod wal;
