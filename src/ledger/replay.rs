//! Replay: folds the log after a state's last event into it, checking the log's rules. Long
//! tails are decoded on several threads while the fold stays sequential.

use super::lock;
use crate::domain::event::Event;
use crate::domain::state::{Graveyard, State};
use crate::log::reader::{LogReader, LogRules, Wording};
use crate::log::storage::Storage;
use crate::log::wal;
use crate::Result;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

/// Records decoded per batch by the replay's decoder threads. Batches in flight (queued,
/// being decoded, decoded and waiting to be folded) are what a full replay holds beyond the
/// state: with 2048 records (and 1 MiB) per batch its peak RSS on the 1M-event benchmark
/// ledger was 2.6 KiB per active allocation, with 256 (and 128 KiB) 1.8 KiB, at the same rate.
const REPLAY_BATCH: usize = 256;

/// Bytes of payload per batch before it is handed over.
const REPLAY_BATCH_BYTES: usize = 128 << 10;

/// Log bytes after the state below which a replay stays on one thread: threads pay off only
/// for a long tail.
const PARALLEL_REPLAY_MIN_BYTES: u64 = 4 << 20;

/// Decoder threads at most (the fold keeps one core).
const MAX_DECODERS: usize = 3;

/// Whether the parallel replay hands evicted allocations back to a decoder thread to drop.
/// With the system allocator (glibc) a free from another thread than the one that allocated
/// is slow, and this took full replay of the 1M-event benchmark log from 500-560k to 575-710k
/// events/s; with mimalloc (the binary's allocator, feature `mimalloc`) such frees are cheap
/// and the hand-back costs more than it saves (1.0-1.1M without, 0.78-0.95M with).
const HAND_BACK_EVICTED: bool = !cfg!(feature = "mimalloc");

/// Replays the log after `state.last_seq` into `state`, checking each event. Decoding runs on
/// several threads while the fold stays sequential; if anything is wrong the sequential path
/// runs instead, so damage is reported with its exact file, offset and sequence number.
///
/// `hint` is where the state's last event sits in the log (from its snapshot). `reload` gives
/// the starting state again: a parallel attempt that fails has folded part of the log into
/// `state`, and keeping a copy instead would double the memory a large state takes.
pub(super) fn replay_into(
    storage: &dyn Storage,
    wal_dir: &Path,
    state: &mut State,
    hint: Option<wal::LogPosition>,
    reload: &dyn Fn() -> Result<State>,
) -> Result<(wal::LogEnd, u64)> {
    // The fold keeps one core; the others decode.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let decoders = (cores - 1).clamp(1, MAX_DECODERS);
    if cores > 1 && wal::bytes_after(storage, wal_dir, state.last_seq, hint)? >= PARALLEL_REPLAY_MIN_BYTES {
        if let Some(done) = replay_parallel(storage, wal_dir, state, hint, decoders) {
            return Ok(done);
        }
        *state = reload()?;
    }
    let mut replayed = 0u64;
    let mut rules = LogRules::after(state.last_seq, state.last_ts_us);
    let reader = LogReader::new(storage, wal_dir).after(state.last_seq).hint(hint);
    let end = reader.events(&mut rules, Wording::Open, &mut |pos, ev| {
        state.evolve_owned(pos.seq, ev.ts_us, ev.body);
        replayed += 1;
        Ok(true)
    })?;
    Ok((end, replayed))
}

/// A batch as a decoder thread returns it: its events, or why one did not decode.
type Decoded = std::result::Result<Vec<(u64, Event)>, String>;

/// Payloads copied out of the log for a decoder thread: one buffer per batch, recycled, so the
/// copy costs no allocation per record.
#[derive(Default)]
struct PayloadBatch {
    bytes: Vec<u8>,
    /// (sequence number, start, end) in `bytes`.
    records: Vec<(u64, usize, usize)>,
    /// Allocations the fold evicted, for the decoder thread to drop (see
    /// `State::evolve_collecting`).
    graveyard: Graveyard,
}

impl PayloadBatch {
    /// Time to hand the batch to a decoder.
    fn is_full(&self) -> bool {
        self.records.len() == REPLAY_BATCH || self.bytes.len() >= REPLAY_BATCH_BYTES
    }

    fn decode(&self) -> Decoded {
        self.records.iter().map(|&(seq, start, end)| Event::decode(&self.bytes[start..end]).map(|e| (seq, e))).collect()
    }
}

/// The fold's side of the parallel replay: decoded batches waiting for their turn, folded
/// strictly in order.
#[derive(Default)]
struct Folder {
    pending: BTreeMap<usize, Decoded>,
    /// Batches folded so far (the index of the next one to fold).
    folded: usize,
    replayed: u64,
    /// Emptied batches, to be filled again.
    spare: Vec<PayloadBatch>,
    graveyard: Graveyard,
    /// The log's rules, checked per event in fold order.
    rules: LogRules,
}

impl Folder {
    /// Keeps a decoded batch until its turn, and its buffers for reuse.
    fn take(&mut self, index: usize, decoded: Decoded, mut spare: PayloadBatch) {
        spare.bytes.clear();
        spare.records.clear();
        self.spare.push(spare);
        self.pending.insert(index, decoded);
    }

    /// Folds every batch whose turn has come, in order.
    fn fold_ready(&mut self, state: &mut State) -> std::result::Result<(), String> {
        while let Some(batch) = self.pending.remove(&self.folded) {
            for (seq, ev) in batch? {
                let graveyard = if HAND_BACK_EVICTED { Some(&mut self.graveyard) } else { None };
                self.rules.check(seq, ev.ts_us, &ev.body).map_err(|b| b.message(Wording::Open))?;
                state.evolve_collecting(seq, ev.ts_us, ev.body, graveyard);
                self.replayed += 1;
            }
            self.folded += 1;
        }
        Ok(())
    }
}

/// A decoder thread: decodes the batches it receives (and drops what the fold evicted) until
/// the work channel closes or the fold stops listening.
fn decode_batches(
    work_rx: &Mutex<mpsc::Receiver<(usize, PayloadBatch)>>,
    done_tx: &mpsc::Sender<(usize, Decoded, PayloadBatch)>,
) {
    loop {
        let job = lock(work_rx).recv();
        let Ok((index, mut batch)) = job else { break };
        batch.graveyard.clear();
        let decoded = batch.decode();
        if done_tx.send((index, decoded, batch)).is_err() {
            break;
        }
    }
}

/// The parallel replay: this thread reads and checks records and folds; `decoders` threads
/// turn batches of payloads into events. `None` means "use the sequential path".
fn replay_parallel(
    storage: &dyn Storage,
    wal_dir: &Path,
    state: &mut State,
    hint: Option<wal::LogPosition>,
    decoders: usize,
) -> Option<(wal::LogEnd, u64)> {
    let (work_tx, work_rx) = mpsc::sync_channel::<(usize, PayloadBatch)>(decoders * 2);
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<(usize, Decoded, PayloadBatch)>();
        for _ in 0..decoders {
            let (work_rx, done_tx) = (&work_rx, done_tx.clone());
            scope.spawn(move || decode_batches(work_rx, &done_tx));
        }
        drop(done_tx);
        let mut folder = Folder { rules: LogRules::after(state.last_seq, state.last_ts_us), ..Folder::default() };
        let mut sent = 0usize;
        let mut batch = PayloadBatch::default();
        let reader = LogReader::new(storage, wal_dir).after(state.last_seq).hint(hint);
        let scanned = reader.records(&mut |pos, payload| {
            let start = batch.bytes.len();
            batch.bytes.extend_from_slice(payload);
            batch.records.push((pos.seq, start, batch.bytes.len()));
            if batch.is_full() {
                let next = folder.spare.pop().unwrap_or_default();
                std::mem::swap(&mut batch.graveyard, &mut folder.graveyard);
                work_tx.send((sent, std::mem::replace(&mut batch, next))).map_err(|_| "decoder stopped".to_string())?;
                sent += 1;
                while let Ok((i, d, spare)) = done_rx.try_recv() {
                    folder.take(i, d, spare);
                }
                folder.fold_ready(state)?;
            }
            Ok(true)
        });
        let end = scanned.ok()?;
        if !batch.records.is_empty() {
            work_tx.send((sent, batch)).ok()?;
            sent += 1;
        }
        drop(work_tx);
        while folder.folded < sent {
            let (i, d, spare) = done_rx.recv().ok()?;
            folder.take(i, d, spare);
            folder.fold_ready(state).ok()?;
        }
        Some((end, folder.replayed))
    })
}
