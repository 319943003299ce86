//! Following the shared log: every copy writes the committed records into its local segment
//! files (from a watch that resumes at a revision; a compacted revision fails loudly and the
//! copy catches up by reading the range), publishes how far it got, and the leader removes the
//! records every live copy has applied and snapshotted (retention).

use super::election::{behind_retention, catch_up};
use super::etcd_log::shared_record;
use super::etcd_log::EtcdLog;
use crate::ledger::{Ledger, WeakLedger};
use crate::log::backend::{FramedRecord, SharedRecord};
use crate::log::layout::{SNAPSHOT_DIR, WAL_DIR};
use crate::log::reader::LogReader;
use crate::log::storage::FsStorage;
use crate::{Error, Result};
use etcd_client::{Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long a watch waits for news before the loop publishes progress and looks around.
const TICK: Duration = Duration::from_millis(500);

/// The follow loop: catch up, watch, apply; publish progress; trim as the leader.
pub async fn follow(log: Weak<EtcdLog>, ledger: WeakLedger) {
    let mut reported: Option<String> = None;
    loop {
        let (Some(l), Some(led)) = (log.upgrade(), ledger.upgrade()) else { return };
        if l.diverged().is_some() {
            drop((l, led));
            tokio::time::sleep(TICK).await;
            continue;
        }
        if l.role().leading.is_none() {
            observe_leader(&l).await;
            let (l2, led2) = (l.clone(), led.clone());
            match tokio::task::spawn_blocking(move || catch_up(&led2, &l2)).await {
                Ok(Ok(_)) => reported = None,
                Ok(Err(e)) => {
                    let why = e.to_string();
                    if reported.as_deref() != Some(why.as_str()) {
                        eprintln!("allocation-ledger replica {}: {why}", l.opts.replica_id);
                        reported = Some(why.clone());
                    }
                    l.set_role(|r| r.why_not = Some(why));
                }
                Err(_) => return,
            }
            watch(&l, &led).await;
        } else {
            tokio::time::sleep(TICK).await;
        }
        publish_progress(&l, &led).await;
        if l.role().leading.is_some() && l.opts.retention {
            trim(&l).await;
        }
    }
}

/// Standbys name the leader to clients: the election's current value.
async fn observe_leader(l: &EtcdLog) {
    let mut client = l.client.clone();
    match tokio::time::timeout(TICK * 4, client.leader(l.keys.election())).await {
        Ok(Ok(r)) => {
            let url = r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string);
            l.set_role(|role| role.leader_url = url.filter(|u| *u != l.opts.advertise_url));
        }
        // The leader named last may be gone: say what is known.
        Ok(Err(e)) => l.set_role(|role| {
            role.leader_url = None;
            role.why_not = Some(format!("not the leader, and no quorum: the shared log (etcd) did not answer: {e}"));
        }),
        Err(_) => l.set_role(|role| {
            role.leader_url = None;
            role.why_not = Some("not the leader, and no quorum: the shared log (etcd) did not answer in time".into());
        }),
    }
}

/// Watches the log keys from the revision after the head just read, applying what arrives in
/// order, for up to a few ticks; returns early on a gap, a compaction or an error (the caller
/// then catches up by reading the range).
async fn watch(l: &Arc<EtcdLog>, led: &Ledger) {
    let mut client = l.client.clone();
    let Ok((_, rev)) = EtcdLog::head(&mut client, &l.keys).await else { return };
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let Ok(mut stream) = client.watch(l.keys.log_prefix(), Some(opts)).await else { return };
    for _ in 0..4 {
        let msg = match tokio::time::timeout(TICK, stream.message()).await {
            Err(_) => continue,
            Ok(Ok(Some(m))) => m,
            Ok(_) => return,
        };
        if msg.canceled() || msg.compact_revision() > 0 {
            eprintln!(
                "allocation-ledger replica {}: the watch of the shared log from revision {} failed (compacted at {}): catching up by reading the range",
                l.opts.replica_id,
                rev + 1,
                msg.compact_revision()
            );
            return;
        }
        let mut records: Vec<SharedRecord> = msg
            .events()
            .iter()
            .filter(|e| e.event_type() == EventType::Put)
            .filter_map(|e| e.kv().and_then(|kv| Some(shared_record(l.keys.seq_of(kv.key())?, kv.value()))))
            .collect();
        records.sort_by_key(|r| r.seq);
        let Some(last) = records.last().map(|r| r.seq) else { continue };
        if records.first().map(|r| r.seq) > Some(led.last_seq() + 1) || l.role().leading.is_some() {
            return;
        }
        l.note_committed(last);
        let (led2, check) = (led.clone(), l.check_chain());
        match tokio::task::spawn_blocking(move || led2.apply_replicated(&records, check)).await {
            Ok(Ok(_)) => {}
            Ok(Err(Error::Poisoned(why))) => {
                l.set_diverged(&why);
                return;
            }
            _ => return,
        }
    }
}

/// Puts this copy's progress (`<applied> <newest snapshot seq>`) under its lease.
async fn publish_progress(l: &EtcdLog, led: &Ledger) {
    let lease = l.lease();
    if lease == 0 {
        return;
    }
    let storage = FsStorage { mmap_min_bytes: 1 << 20 };
    let snapshot = crate::log::snapshot::list(&storage, &led.dir().join(SNAPSHOT_DIR))
        .ok()
        .and_then(|s| s.first().map(|f| f.0))
        .unwrap_or(0);
    let value = format!("{} {snapshot}", led.last_seq());
    let mut client = l.client.clone();
    let _ = tokio::time::timeout(
        TICK,
        client.put(l.keys.replica(&l.opts.replica_id), value, Some(PutOptions::new().with_lease(lease))),
    )
    .await;
}

/// The leader removes the records every live copy has applied and covered by a snapshot
/// (never the head record), fenced like an append, and moves `log-start` past them.
async fn trim(l: &EtcdLog) {
    let Some((key, rev)) = l.role().leading else { return };
    let mut client = l.client.clone();
    let Ok(resp) = client.get(l.keys.replicas_prefix(), Some(GetOptions::new().with_prefix())).await else { return };
    let covered = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let mut it = kv.value_str().ok()?.split(' ').map(|n| n.parse::<u64>().ok());
            Some(it.next()??.min(it.next()??))
        })
        .min();
    let Ok((head, _)) = EtcdLog::head(&mut client, &l.keys).await else { return };
    let start = match client.get(l.keys.log_start(), None).await {
        Ok(r) => r.kvs().first().and_then(|kv| kv.value_str().ok()?.parse().ok()).unwrap_or(1u64),
        Err(_) => return,
    };
    let Some(upto) = covered.map(|c| c.min(head.saturating_sub(1))).filter(|u| *u >= start) else { return };
    let txn = Txn::new().when([Compare::create_revision(key, CompareOp::Equal, rev)]).and_then([
        TxnOp::delete(l.keys.log(start), Some(DeleteOptions::new().with_range(l.keys.log(upto + 1)))),
        TxnOp::put(l.keys.log_start(), (upto + 1).to_string(), None),
    ]);
    let _ = client.txn(txn).await;
}

/// A new leader whose local files hold records the shared log does not (a ledger created
/// here, or a local ledger put on an empty cluster) appends them first.
pub(super) fn push_local(ledger: &Ledger, log: &EtcdLog, key: &etcd_client::LeaderKey) -> Result<()> {
    let (from, to) = (log.committed(), ledger.last_seq());
    if from >= to {
        return Ok(());
    }
    let storage = FsStorage { mmap_min_bytes: 1 << 20 };
    let wal = ledger.dir().join(WAL_DIR);
    let mut payloads = Vec::new();
    LogReader::new(&storage, &wal).after(from).upto(to).records(&mut |pos, payload| {
        payloads.push((pos.seq, payload.to_vec(), pos.chain));
        Ok(true)
    })?;
    if payloads.first().map(|p| p.0) != Some(from + 1) {
        return Err(behind_retention(from));
    }
    let records: Vec<FramedRecord<'_>> =
        payloads.iter().map(|(seq, p, chain)| FramedRecord { seq: *seq, payload: p, chain: *chain }).collect();
    if from == 0 && records.iter().any(|r| r.chain.is_none()) {
        // This log predates the chain: copies cannot compare values with it (docs/replication.md).
        let (mut client, k) = (log.client.clone(), log.keys.clone());
        log.block(async move { client.put(k.chain_off(), "the first leader's log predates the chain", None).await })
            .transpose()
            .map_err(|e| super::etcd_error("the chain-off marker", &e))?;
        log.no_chain_check("this copy's log predates the chain (format 4)");
    }
    log.append_as(key.key(), key.rev(), &records).map_err(Error::Unavailable)
}
