//! The log backend seam: where the commit pipeline (`ledger/commit.rs`) makes a batch of
//! framed records durable. Two implementations share one interface:
//!
//! - the **local write-ahead log** ([`LocalWal`] without a replicator): the writer's outbox is
//!   written with one positional write and fdatasynced (today's files and flock);
//! - the **replicated log** ([`LocalWal`] with a [`Replicator`], e.g. etcd in `src/replica/`):
//!   the same batch is first committed elsewhere ("append these records after seq N", refused
//!   when the log there moved on or this copy lost the right to write), and only then written
//!   and fsynced locally, so a local segment never holds a record the shared log does not.
//!
//! The core, history and interfaces do not know which one runs: they read the local segment
//! files, which every copy keeps in the same format.

use crate::log::chain::{ChainValue, CHAIN_BYTES};
use crate::log::record::{Framing, RecordHeader, HEADER_LEN};
use crate::log::wal::Outbox;
use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// Where the commit pipeline makes records durable (see the module docs).
pub trait LogBackend: Send + Sync + std::fmt::Debug {
    /// Makes every record handed to the writer's outbox so far durable, as one batch after the
    /// last durable one. Returns the last sequence number now durable. An error stops the
    /// ledger (the records are folded, their fate is unknown): it is never retried.
    fn sync(&self) -> Result<u64>;
    /// Writes the queued records to the local files without making them durable, so a reader
    /// of the files finds every event folded so far. A replicated log commits them first (a
    /// local file must never hold a record the shared log refused).
    fn write_queued(&self) -> Result<()>;
    /// `Err` when this copy may not decide writes now (a standby: the error names the
    /// leader). Checked before a write command is queued.
    fn check_writable(&self) -> Result<()>;
    /// The last handle is gone: make what is queued durable if that is still safe.
    fn close(&self);
    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// The ledger reloaded its files (a replicated copy that lost leadership): its writer now
    /// queues into `outbox`.
    fn reopened(&self, outbox: Arc<Outbox>);
}

/// A shared log a batch must reach before it counts as durable (etcd: `src/replica/`).
pub trait Replicator: Send + Sync + std::fmt::Debug {
    /// Appends `records` (framed records, `after_seq + 1` first, contiguous) durably after
    /// `after_seq`; fails, and appends nothing, when the shared log no longer ends at
    /// `after_seq` or this copy lost the right to write (fencing).
    fn append(&self, after_seq: u64, records: &[FramedRecord<'_>]) -> std::result::Result<(), String>;
    /// `Err` when this copy may not decide writes now ([`LogBackend::check_writable`]).
    fn check_writable(&self) -> Result<()>;
}

/// One record of a batch, as the writer framed it.
#[derive(Debug, Clone, Copy)]
pub struct FramedRecord<'a> {
    /// Its sequence number.
    pub seq: u64,
    #[cfg_attr(
        not(feature = "etcd"),
        allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it")
    )]
    /// The event's bytes (the record's payload; framing is each copy's own).
    pub payload: &'a [u8],
    #[cfg_attr(
        not(feature = "etcd"),
        allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it")
    )]
    /// The record's chain value as this copy stamped it (`None` in an older, unchained
    /// segment): the shared log carries it, so that other copies compare theirs with it.
    pub chain: Option<ChainValue>,
}

/// Splits a batch of framed records (as the outbox holds them) into records. The writer
/// framed them moments ago, so a short or inconsistent frame is a bug, reported as an error.
pub fn split_records(mut bytes: &[u8], framing: Framing) -> std::result::Result<Vec<FramedRecord<'_>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let header = RecordHeader::decode(bytes).map_err(|_| "a queued record's header is cut short".to_string())?;
        let end = framing.overhead() + header.payload_len();
        let payload = bytes.get(framing.overhead()..end).ok_or("a queued record's payload is cut short")?;
        let chain = match framing {
            Framing::Chained => bytes
                .get(HEADER_LEN..HEADER_LEN + CHAIN_BYTES)
                .and_then(|b| <[u8; CHAIN_BYTES]>::try_from(b).ok())
                .map(ChainValue),
            Framing::Plain => None,
        };
        out.push(FramedRecord { seq: header.seq, payload, chain });
        bytes = &bytes[end..];
    }
    Ok(out)
}

/// The local write-ahead log as a backend, optionally behind a [`Replicator`].
#[derive(Debug)]
pub struct LocalWal {
    /// The writer's outbox; replaced when a replicated ledger reloads from its files.
    outbox: Mutex<Arc<Outbox>>,
    replicator: Option<Arc<dyn Replicator>>,
}

impl LocalWal {
    /// The local log whose writer queues into `outbox`.
    pub fn new(outbox: Arc<Outbox>, replicator: Option<Arc<dyn Replicator>>) -> LocalWal {
        let wal = LocalWal { outbox: Mutex::new(outbox.clone()), replicator };
        wal.hook_into(&outbox);
        wal
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// Points the backend at a new writer's outbox (after the ledger reloaded its files).
    pub fn set_outbox(&self, outbox: Arc<Outbox>) {
        self.hook_into(&outbox);
        *lock(&self.outbox) = outbox;
    }

    fn outbox(&self) -> Arc<Outbox> {
        lock(&self.outbox).clone()
    }

    /// With a replicator, every batch the writer writes (by a flush, or by a rotation that
    /// seals a full segment) is committed to the shared log first.
    fn hook_into(&self, outbox: &Outbox) {
        let Some(r) = self.replicator.clone() else { return };
        outbox.set_commit_first(Arc::new(move |bytes: &[u8], framing| {
            let records = split_records(bytes, framing)?;
            match records.first() {
                Some(first) => r.append(first.seq - 1, &records),
                None => Ok(()),
            }
        }));
    }
}

impl LogBackend for LocalWal {
    fn sync(&self) -> Result<u64> {
        let outbox = self.outbox();
        let written = outbox.write_out()?;
        outbox.sync(&written).map_err(|e| Error::Poisoned(format!("fsync of the log failed: {e}")))?;
        Ok(written.last_seq)
    }

    fn write_queued(&self) -> Result<()> {
        self.outbox().write_out().map(drop)
    }

    fn check_writable(&self) -> Result<()> {
        self.replicator.as_ref().map_or(Ok(()), |r| r.check_writable())
    }

    fn close(&self) {
        let _ = self.sync();
    }

    fn reopened(&self, outbox: Arc<Outbox>) {
        self.set_outbox(outbox);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A record as the shared log holds it (a copy that follows folds these): its sequence number,
/// payload, and the chain value the copy that wrote it gave it, if it carried one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The event's bytes.
    pub payload: Vec<u8>,
    /// The writer's chain value for it (`None`: written without one, by an older build or
    /// from an unchained segment): a follower compares its own with it.
    pub chain: Option<ChainValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::storage::MemoryStorage;
    use crate::log::wal::WalWriter;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A shared log that takes batches in order until `refuse_after`, then refuses them all.
    #[derive(Debug)]
    struct Shared {
        head: AtomicU64,
        refuse_after: u64,
    }

    impl Replicator for Shared {
        fn append(&self, after_seq: u64, records: &[FramedRecord<'_>]) -> std::result::Result<(), String> {
            let last = records.last().map_or(after_seq, |r| r.seq);
            if self.head.load(Ordering::SeqCst) != after_seq || last > self.refuse_after {
                return Err(format!("refused {}..={last}", after_seq + 1));
            }
            self.head.store(last, Ordering::SeqCst);
            Ok(())
        }
        fn check_writable(&self) -> Result<()> {
            Ok(())
        }
    }

    /// The last sequence number in the local files.
    fn local_last_seq(storage: &MemoryStorage, dir: &Path) -> u64 {
        crate::log::wal::scan_log(storage, dir, 0, &mut |_, _| Ok(true)).unwrap().last_seq
    }

    /// A rotation (a full segment sealed) writes the segment's last batch to the files only
    /// after the shared log took it, as a flush does: a copy's files never hold a record the
    /// shared log refused, whichever of the two wrote it.
    #[test]
    fn a_rotation_commits_to_the_shared_log_before_writing_locally() {
        for refuse_after in [u64::MAX, 5] {
            let storage = Arc::new(MemoryStorage::new());
            let dir = Path::new("/wal");
            let mut wal = WalWriter::create(storage.clone(), dir, 4096).unwrap();
            let shared = Arc::new(Shared { head: AtomicU64::new(0), refuse_after });
            let backend = LocalWal::new(wal.outbox().clone(), Some(shared.clone()));
            let payload = vec![b'x'; 600];
            let mut refused = false;
            for _ in 0..40 {
                match wal.append(&payload) {
                    Ok(_) => wal.hand_off(),
                    Err(crate::log::wal::AppendError::Poison(e)) => {
                        assert!(matches!(e, crate::error::Error::Unavailable(_)), "{e}");
                        refused = true;
                        break;
                    }
                    Err(crate::log::wal::AppendError::Failed(e)) => panic!("{e}"),
                }
            }
            if !refused {
                backend.sync().unwrap();
            }
            let local = local_last_seq(&storage, dir);
            let committed = shared.head.load(Ordering::SeqCst);
            assert!(local <= committed, "local files hold {local}, the shared log only {committed}");
            if refuse_after == u64::MAX {
                assert_eq!((local, committed), (40, 40));
                assert!(crate::log::wal::list_segments(&*storage, dir).unwrap().len() > 2, "rotated");
            } else {
                assert!(refused, "a rotation hit the refusal");
                assert!(committed <= 5);
            }
        }
    }
}
