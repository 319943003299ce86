//! The shared log on etcd: the [`Replicator`] the commit pipeline makes every batch durable
//! through. A batch is appended with one transaction (split to stay within etcd's limits)
//! that succeeds only if the head is still the one the leader folded from *and* the leader's
//! election key still exists with the create revision it won with (fencing: a lease alone does
//! not give mutual exclusion, a paused leader's lease may have expired and been re-won).

use super::{decode_value, encode_value, etcd_error, EtcdOptions, Keys};
use crate::log::backend::{FramedRecord, Replicator, SharedRecord};
use crate::{Error, Result};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// etcd's default `--max-txn-ops`: operations in one transaction (records plus the head).
pub const MAX_TXN_OPS: usize = 128;
/// What one transaction carries at most in record bytes: below etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for the keys and the framing of the request.
pub const MAX_TXN_BYTES: usize = 1 << 20;

/// Whether this copy leads, and whom to name when it does not.
#[derive(Debug, Clone, Default)]
pub struct Role {
    /// The election key this copy won with and its create revision, while it leads.
    pub leading: Option<(Vec<u8>, i64)>,
    /// The leader's advertised URL, as last observed.
    pub leader_url: Option<String>,
    /// Why this copy stepped down, until it leads again or a leader is observed.
    pub why_not: Option<String>,
}

/// The shared log, seen from one copy.
pub struct EtcdLog {
    rt: tokio::runtime::Handle,
    /// Keeps the runtime up while the copy is open (its tasks hold only weak references).
    _runtime: Arc<Runtime>,
    pub(super) client: Client,
    pub(super) keys: Keys,
    pub(super) opts: EtcdOptions,
    role: Mutex<Role>,
    /// Every record up to here is committed in etcd (a standby's records came from there).
    committed: AtomicU64,
    lease: std::sync::atomic::AtomicI64,
    /// Told when an append was refused or failed: the copy must drop what it folded.
    pub(super) lost: tokio::sync::Notify,
    /// Why this copy refuses to serve: its chain diverged from the shared log's (it then
    /// neither campaigns nor follows).
    diverged: Mutex<Option<String>>,
    /// Compare chain values with the shared log's (off when either side's log predates the
    /// chain: their values count from different records).
    check_chain: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EtcdLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLog").field("opts", &self.opts).field("role", &self.role()).finish_non_exhaustive()
    }
}

impl EtcdLog {
    /// The shared log of `opts`'s cluster, reached with `client` on the runtime `rt`.
    pub fn new(runtime: Arc<Runtime>, rt: tokio::runtime::Handle, client: Client, opts: EtcdOptions) -> EtcdLog {
        EtcdLog {
            rt,
            _runtime: runtime,
            client,
            keys: super::Keys::new(&opts.cluster),
            opts,
            role: Mutex::new(Role::default()),
            committed: AtomicU64::new(0),
            lease: std::sync::atomic::AtomicI64::new(0),
            lost: tokio::sync::Notify::new(),
            diverged: Mutex::new(None),
            check_chain: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Runs `fut` on the replica's runtime and waits for it from any thread (a tokio worker of
    /// another runtime included), at most the request timeout; `None` when it took longer.
    pub fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(self.opts.request_timeout).ok()
    }

    /// Why this copy refuses to serve, once its chain diverged.
    pub fn diverged(&self) -> Option<String> {
        lock(&self.diverged).clone()
    }

    /// The copy's chain diverged from the shared log's (`why`): it steps down and refuses to
    /// serve until it is rebuilt.
    pub fn set_diverged(&self, why: &str) {
        let first = lock(&self.diverged).replace(why.to_string()).is_none();
        if first {
            eprintln!("allocation-ledger replica {}: {why}", self.opts.replica_id);
        }
        let _ = self.step_down(why.to_string());
    }

    /// Whether chain values are compared with the shared log's.
    pub fn check_chain(&self) -> bool {
        self.check_chain.load(Ordering::Acquire)
    }

    /// Stops comparing chain values (`why`, said once on stderr).
    pub fn no_chain_check(&self, why: &str) {
        if self.check_chain.swap(false, Ordering::AcqRel) {
            eprintln!("allocation-ledger replica {}: chain values are not compared: {why}", self.opts.replica_id);
        }
    }

    /// The role now.
    pub fn role(&self) -> Role {
        lock(&self.role).clone()
    }

    /// Changes the role.
    pub fn set_role(&self, f: impl FnOnce(&mut Role)) {
        f(&mut lock(&self.role));
    }

    /// Records up to `seq` are known to be in etcd.
    pub fn note_committed(&self, seq: u64) {
        self.committed.fetch_max(seq, Ordering::AcqRel);
    }

    /// Every record up to this one is in etcd.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// The message a write gets on a copy that does not lead.
    pub fn not_leader(&self) -> String {
        if let Some(why) = self.diverged() {
            return why;
        }
        let role = self.role();
        match (role.leader_url, role.why_not) {
            (Some(url), _) => format!("not the leader, the leader is {url}"),
            (None, Some(why)) => why,
            (None, None) => "not the leader, and no leader is elected right now (retry shortly)".into(),
        }
    }

    /// Leadership is lost (`why`): writes are refused and, if this copy led, it reloads its
    /// files (the supervisor is told).
    fn step_down(&self, why: String) -> String {
        let was_leading = {
            let mut role = lock(&self.role);
            role.why_not = Some(why.clone());
            let was_leading = role.leading.take().is_some();
            if was_leading || role.leader_url.as_deref() == Some(&self.opts.advertise_url) {
                role.leader_url = None;
            }
            was_leading
        };
        if was_leading {
            eprintln!("allocation-ledger replica {}: stepped down: {why}", self.opts.replica_id);
            self.lost.notify_one();
        }
        why
    }

    /// [`EtcdLog::step_down`] for the lease keeper.
    pub fn lose(&self, why: &str) {
        let _ = self.step_down(why.to_string());
    }

    /// The lease this copy's campaign and progress key live on.
    pub fn set_lease(&self, id: i64) {
        self.lease.store(id, Ordering::Release);
    }

    /// [`EtcdLog::set_lease`]'s value (0: none yet).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// The head (last committed seq) and the store's revision; 0 when nothing was committed.
    pub async fn head(client: &mut Client, keys: &Keys) -> std::result::Result<(u64, i64), etcd_client::Error> {
        let resp = client.get(keys.head(), None).await?;
        let rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let head = resp.kvs().first().and_then(|kv| kv.value_str().ok()?.parse().ok()).unwrap_or(0);
        Ok((head, rev))
    }

    /// Records `from..=to` (at most `limit`), in order, with the store's revision.
    pub async fn records(
        client: &mut Client,
        keys: &Keys,
        from: u64,
        to: u64,
        limit: i64,
    ) -> std::result::Result<(Vec<SharedRecord>, i64), etcd_client::Error> {
        let opts = GetOptions::new().with_range(keys.log(to + 1)).with_limit(limit);
        let mut resp = client.get(keys.log(from), Some(opts)).await?;
        let rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let out = resp
            .take_kvs()
            .into_iter()
            .filter_map(|kv| {
                let seq = keys.seq_of(kv.key())?;
                Some(shared_record(seq, kv.value()))
            })
            .collect();
        Ok((out, rev))
    }

    /// One fenced transaction: `records` after `after`, the head moved to the last of them.
    fn txn(&self, key: &[u8], rev: i64, after: u64, records: &[&FramedRecord<'_>]) -> Txn {
        let head = self.keys.head();
        let head_is = match after {
            0 => Compare::version(head.clone(), CompareOp::Equal, 0),
            n => Compare::value(head.clone(), CompareOp::Equal, n.to_string()),
        };
        let mut ops: Vec<TxnOp> = records
            .iter()
            .map(|r| TxnOp::put(self.keys.log(r.seq), encode_value(r.chain.as_ref(), r.payload), None))
            .collect();
        let last = records.last().map_or(after, |r| r.seq);
        ops.push(TxnOp::put(head, last.to_string(), None));
        Txn::new().when([Compare::create_revision(key.to_vec(), CompareOp::Equal, rev), head_is]).and_then(ops)
    }

    /// Why a fenced transaction was refused: another copy leads, or the log moved on.
    fn refused(&self) -> String {
        let (mut client, name) = (self.client.clone(), self.keys.election());
        let leader = self.block(async move { client.leader(name).await }).and_then(std::result::Result::ok);
        match leader.as_ref().and_then(|l| l.kv()).and_then(|kv| kv.value_str().ok()) {
            Some(url) if url != self.opts.advertise_url => {
                let url = url.to_string();
                self.set_role(|r| r.leader_url = Some(url.clone()));
                format!("not the leader, the leader is {url}")
            }
            _ => "not the leader: this copy's election key or log head is no longer the one it wrote after (fenced); it steps down and catches up".into(),
        }
    }
}

impl EtcdLog {
    /// Commits one part of a batch. A transport error (an etcd member went away) is retried
    /// until the request timeout: the head compare makes a retry safe, and a retry refused
    /// after an error checks whether the earlier attempt landed.
    fn commit_part(
        &self,
        key: &[u8],
        rev: i64,
        after: u64,
        batch: &[&FramedRecord<'_>],
    ) -> std::result::Result<(), String> {
        let deadline = std::time::Instant::now() + self.opts.request_timeout;
        let mut retried = false;
        loop {
            let (mut client, txn) = (self.client.clone(), self.txn(key, rev, after, batch));
            match self.block(async move { client.txn(txn).await }) {
                Some(Ok(r)) if r.succeeded() => return Ok(()),
                Some(Ok(_)) if retried && self.landed(batch) => return Ok(()),
                Some(Ok(_)) => return Err(self.step_down(self.refused())),
                Some(Err(_)) if std::time::Instant::now() < deadline => {
                    retried = true;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Some(Err(e)) => return Err(self.step_down(etcd_error("the append", &e).to_string())),
                None => {
                    return Err(self.step_down(format!(
                        "no quorum: the shared log (etcd) did not commit within {:?}; the write was not acknowledged",
                        self.opts.request_timeout
                    )))
                }
            }
        }
    }

    /// Whether `batch` is in etcd as written (an attempt whose answer was lost committed it).
    fn landed(&self, batch: &[&FramedRecord<'_>]) -> bool {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return true };
        let (mut client, keys, (from, to)) = (self.client.clone(), self.keys.clone(), (first.seq, last.seq));
        let limit = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        match self.block(async move { EtcdLog::records(&mut client, &keys, from, to, limit).await }) {
            Some(Ok((found, _))) => {
                found.len() == batch.len()
                    && found.iter().zip(batch).all(|(f, r)| f.seq == r.seq && f.payload == r.payload)
            }
            _ => false,
        }
    }
}

/// Splits `records` into transactions within etcd's limits.
fn batches<'r, 'a>(records: &'r [&'r FramedRecord<'a>]) -> Vec<&'r [&'r FramedRecord<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let full = i - start == MAX_TXN_OPS - 1
            || (i > start && bytes + r.payload.len() + 1 + crate::log::chain::CHAIN_BYTES > MAX_TXN_BYTES);
        if full {
            out.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += r.payload.len() + 1 + crate::log::chain::CHAIN_BYTES;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

impl Replicator for EtcdLog {
    fn append(&self, _after_seq: u64, records: &[FramedRecord<'_>]) -> std::result::Result<(), String> {
        if !records.iter().any(|r| r.seq > self.committed()) {
            return Ok(());
        }
        let Some((key, rev)) = self.role().leading else { return Err(self.step_down(self.not_leader())) };
        self.append_as(&key, rev, records)
    }

    fn check_writable(&self) -> Result<()> {
        match self.role().leading {
            Some(_) => Ok(()),
            None => Err(Error::Unavailable(self.not_leader())),
        }
    }
}

impl EtcdLog {
    /// Appends the records not yet committed, fenced by the election key `key` won at `rev`.
    pub fn append_as(&self, key: &[u8], rev: i64, records: &[FramedRecord<'_>]) -> std::result::Result<(), String> {
        let committed = self.committed();
        let fresh: Vec<&FramedRecord<'_>> = records.iter().filter(|r| r.seq > committed).collect();
        let Some(first) = fresh.first() else { return Ok(()) };
        let mut after = first.seq - 1;
        for batch in batches(&fresh) {
            let last = batch.last().map_or(after, |r| r.seq);
            self.commit_part(key, rev, after, batch)?;
            self.note_committed(last);
            after = last;
        }
        Ok(())
    }
}

/// A record read from etcd (its value as [`encode_value`] wrote it).
pub fn shared_record(seq: u64, value: &[u8]) -> SharedRecord {
    let (chain, payload) = decode_value(value);
    SharedRecord { seq, payload: payload.to_vec(), chain }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The replica's runtime, shut down without blocking when the last copy handle goes (a
/// ledger may be dropped inside another runtime, where blocking is not allowed).
#[derive(Debug)]
pub struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    /// A small runtime of its own (two workers).
    pub fn new() -> Result<Arc<Runtime>> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ledger-etcd")
            .enable_all()
            .build()
            .map(|rt| Arc::new(Runtime(Some(rt))))
            .map_err(|e| Error::io("starting the etcd client's runtime", e))
    }

    /// Its handle.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|rt| rt.handle().clone())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
