//! Opening a copy, and its leadership: campaign with a lease (etcd's election API), catch up
//! to the head before serving writes, step down when an append is refused (the fence) or the
//! lease is lost, and reload the files so nothing folded but not committed stays.

use super::etcd_log::{EtcdLog, Runtime};
use super::{compare_chain, etcd_error, follower, EtcdOptions};
use crate::ledger::{Ledger, OpenOptions, WeakLedger};
use crate::log::layout::WAL_DIR;
use crate::{Error, Result};
use etcd_client::{Client, ConnectOptions, LeaderKey, ResignOptions};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How many records one catch-up read fetches.
const CATCH_UP_PAGE: i64 = 512;

/// Opens the copy in `dir`: connects, creates or opens the local files (from the shared log's
/// first record, or as a new ledger once this copy won the first election), catches up to the
/// head, and starts campaigning and following in the background.
pub fn open(dir: &Path, opts: OpenOptions, etcd: &EtcdOptions) -> Result<Ledger> {
    let runtime = Runtime::new()?;
    let rt = runtime.handle().ok_or_else(|| Error::Unavailable("the etcd runtime is gone".into()))?;
    let connect = ConnectOptions::new()
        .with_connect_timeout(etcd.request_timeout)
        .with_timeout(etcd.request_timeout)
        .with_keep_alive(Duration::from_secs(1), etcd.request_timeout);
    let endpoints = etcd.endpoints.clone();
    let client = run(&rt, etcd.request_timeout * 2, async move { Client::connect(endpoints, Some(connect)).await })
        .and_then(|r| r.map_err(|e| etcd_error("the connection", &e)))?;
    let log = Arc::new(EtcdLog::new(runtime, rt.clone(), client, etcd.clone()));
    let (head, _) = log_call(&log, |mut c, k| async move { EtcdLog::head(&mut c, &k).await })?;
    let fresh = !dir.join(WAL_DIR).exists();
    let mut won = None;
    let first = match (fresh, head) {
        (true, 0) => {
            // A new cluster: only the first leader creates the ledger (two copies creating
            // their own first record would diverge).
            won = Some(campaign_now(&log)?);
            None
        }
        (true, _) => Some(first_record(&log)?),
        (false, _) => None,
    };
    let ledger = Ledger::open_local_copy(dir, opts, log.clone(), first)?;
    let local = ledger.last_seq();
    if head > 0 && local > head {
        return Err(Error::Unavailable(format!(
            "this copy's log ends at {local}, beyond the shared log's head {head}: it diverged; move its directory aside"
        )));
    }
    check_local_chain(&ledger, &log, head)?;
    log.note_committed(local.min(head));
    catch_up(&ledger, &log)?;
    if let Some(key) = &won {
        take_lead(&ledger, &log, key)?;
    }
    let lease_held = won.as_ref().map(LeaderKey::lease);
    rt.spawn(supervise(Arc::downgrade(&log), ledger.downgrade(), won, lease_held));
    rt.spawn(follower::follow(Arc::downgrade(&log), ledger.downgrade()));
    Ok(ledger)
}

/// Runs `fut` on `rt` from any thread, at most `timeout`.
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    timeout: Duration,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv_timeout(timeout)
        .map_err(|_| Error::Unavailable(format!("no quorum: the shared log (etcd) did not answer within {timeout:?}")))
}

/// One etcd read on the log's client, waited for from this thread. A read that fails (an
/// etcd member went away: the client's balancer may still pick it) is tried again until the
/// request timeout: reads are idempotent.
pub(super) fn log_call<
    T: Send + 'static,
    F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
>(
    log: &EtcdLog,
    call: impl Fn(Client, super::Keys) -> F,
) -> Result<T> {
    let deadline = std::time::Instant::now() + log.opts.request_timeout;
    loop {
        let fut = call(log.client.clone(), log.keys.clone());
        match log.block(fut) {
            Some(Ok(v)) => return Ok(v),
            Some(Err(_)) if std::time::Instant::now() + RETRY_PAUSE < deadline => std::thread::sleep(RETRY_PAUSE),
            Some(Err(e)) => return Err(etcd_error("a read", &e)),
            None => {
                return Err(Error::Unavailable(format!(
                    "no quorum: the shared log (etcd) did not answer within {:?}",
                    log.opts.request_timeout
                )))
            }
        }
    }
}

/// The pause before a failed etcd request is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The shared log's first record (a new copy's local files start from it).
fn first_record(log: &EtcdLog) -> Result<Vec<u8>> {
    let (records, _) = log_call(log, |mut c, k| async move { EtcdLog::records(&mut c, &k, 1, 1, 1).await })?;
    records.into_iter().next().map(|r| r.payload).ok_or_else(|| {
        Error::Unavailable(
            "cannot create this copy from the shared log: its first records were removed by retention; \
             copy a peer's data directory (snapshots and log) here and start again"
                .into(),
        )
    })
}

/// Campaigns until this copy wins (blocking: used at open for a new cluster).
fn campaign_now(log: &Arc<EtcdLog>) -> Result<LeaderKey> {
    let (ttl, url, name) = (log.opts.lease_ttl_seconds, log.opts.advertise_url.clone(), log.keys.election());
    let (tx, rx) = std::sync::mpsc::channel();
    let mut client = log.client.clone();
    log.block(async move {
        let r = async {
            let lease = client.lease_grant(ttl, None).await?.id();
            let key = client.campaign(name, url, lease).await?.take_leader();
            Ok::<_, etcd_client::Error>(key)
        }
        .await;
        let _ = tx.send(r);
    });
    match rx.recv() {
        Ok(Ok(Some(key))) => Ok(key),
        Ok(Ok(None)) => Err(Error::Unavailable("the election answered without a leader key".into())),
        Ok(Err(e)) => Err(etcd_error("the campaign", &e)),
        Err(_) => Err(Error::Unavailable("the campaign was cut short".into())),
    }
}

/// Folds every committed record after the local end into the copy, up to the head.
pub(super) fn catch_up(ledger: &Ledger, log: &EtcdLog) -> Result<u64> {
    loop {
        let (head, _) = log_call(log, |mut c, k| async move { EtcdLog::head(&mut c, &k).await })?;
        let local = ledger.last_seq();
        if local >= head {
            return Ok(local);
        }
        let (records, _) = log_call(log, move |mut c, k| async move {
            EtcdLog::records(&mut c, &k, local + 1, head, CATCH_UP_PAGE).await
        })?;
        match records.first() {
            Some(r) if r.seq == local + 1 => {}
            _ => return Err(behind_retention(local)),
        }
        let last = records.last().map_or(local, |r| r.seq);
        log.note_committed(last);
        if let Err(e) = ledger.apply_replicated(&records, log.check_chain()) {
            if let Error::Poisoned(why) = &e {
                log.set_diverged(why);
            }
            return Err(e);
        }
    }
}

/// Before this copy serves: its local log must pass its own chain check (every stored value
/// recomputed: an edited record is found even with a good CRC), and its chain value at its
/// last record must be the one the shared log carries there (a record replaced and the chain
/// recomputed after it is found). Chain values are not compared when either log predates the
/// chain (their values count from different records).
fn check_local_chain(ledger: &Ledger, log: &EtcdLog, head: u64) -> Result<()> {
    let local = ledger.last_seq();
    let storage = crate::log::storage::FsStorage { mmap_min_bytes: 1 << 20 };
    let wal = ledger.dir().join(WAL_DIR);
    let end = crate::log::reader::LogReader::new(&storage, &wal)
        .retained()
        .verify_chain()
        .upto(local)
        .records(&mut |_, _| Ok(true))
        .map_err(|e| {
            Error::Poisoned(format!(
                "this copy's local log fails its chain check: {e}; it refuses to serve. Move its data \
                 directory aside and start it empty (it rebuilds from the shared log) or from a copy of a \
                 healthy peer's"
            ))
        })?;
    // Older, unchained segments before the chain begins (archived ones are not counted).
    let first = end.segments.first().map_or(1, |s| s.first_seq);
    if local > 0 && end.chain_from.is_none_or(|from| from > first) {
        log.no_chain_check("this copy's log predates the chain (format 4)");
    }
    let off = log_call(log, |mut c, k| async move { Ok(!c.get(k.chain_off(), None).await?.kvs().is_empty()) })?;
    if off {
        log.no_chain_check("the first leader's log predates the chain");
    }
    if local == 0 || local > head || !log.check_chain() {
        return Ok(());
    }
    let (records, _) =
        log_call(log, move |mut c, k| async move { EtcdLog::records(&mut c, &k, local, local, 1).await })?;
    let there = records.first().filter(|r| r.seq == local).and_then(|r| r.chain);
    compare_chain(local, end.chain, there)
}

/// The error of a copy whose next record the shared log no longer keeps.
pub(super) fn behind_retention(local: u64) -> Error {
    Error::Unavailable(format!(
        "this copy cannot catch up: it ends at record {local} and the shared log no longer keeps record {} \
         (retention removed it after every live copy had it); copy a peer's data directory (a snapshot \
         and the log after it) here and start again",
        local + 1
    ))
}

/// This copy won: catch up to the head, push what only the local files hold (a ledger
/// created here, or an existing local ledger put on an empty cluster), then serve writes.
fn take_lead(ledger: &Ledger, log: &Arc<EtcdLog>, key: &LeaderKey) -> Result<()> {
    catch_up(ledger, log)?;
    // Writes are still refused here, so the local files end at the ledger's last record.
    follower::push_local(ledger, log, key)?;
    log.set_role(|r| {
        r.leading = Some((key.key().to_vec(), key.rev()));
        r.leader_url = Some(log.opts.advertise_url.clone());
        r.why_not = None;
    });
    Ok(())
}

/// The background leadership loop: campaign (with a lease kept alive), lead until an append is
/// refused or the lease is lost, then reload the files and campaign again.
async fn supervise(log: Weak<EtcdLog>, ledger: WeakLedger, mut won: Option<LeaderKey>, mut lease: Option<i64>) {
    loop {
        let Some(l) = log.upgrade() else { return };
        if l.diverged().is_some() {
            // It refuses to serve: no campaign (and no lease, so retention goes on without it).
            drop(l);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let (mut client, ttl) = (l.client.clone(), l.opts.lease_ttl_seconds);
        let lease_id = match lease.take() {
            Some(id) => id,
            None => match client.lease_grant(ttl, None).await {
                Ok(r) => r.id(),
                Err(e) => {
                    l.set_role(|r| r.why_not = Some(etcd_error("the lease", &e).to_string()));
                    drop(l);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let keeper = tokio::spawn(keep_alive(log.clone(), client.clone(), lease_id, ttl));
        l.set_lease(lease_id);
        // The copy that won at open leads already (it created the ledger).
        let (key, leading) = match won.take() {
            Some(key) => (Some(key), true),
            None => tokio::select! {
                key = campaign(&l, &mut client, lease_id) => (key, false),
                () = dropped(&ledger) => (None, false),
            },
        };
        if let Some(key) = key {
            tokio::select! {
                () = lead(&l, &ledger, &key, leading) => {}
                () = dropped(&ledger) => {}
            }
            let _ = client.resign(Some(ResignOptions::new().with_leader(key))).await;
        }
        keeper.abort();
        let _ = client.lease_revoke(lease_id).await;
        drop(l);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Campaigns; `None` if the campaign failed (etcd unreachable: retried by the caller).
async fn campaign(l: &EtcdLog, client: &mut Client, lease_id: i64) -> Option<LeaderKey> {
    match client.campaign(l.keys.election(), l.opts.advertise_url.clone(), lease_id).await {
        Ok(mut r) => r.take_leader(),
        Err(e) => {
            l.set_role(|r| r.why_not = Some(etcd_error("the campaign", &e).to_string()));
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    }
}

/// Leads until leadership is lost, then drops what was folded but not committed.
async fn lead(l: &Arc<EtcdLog>, ledger: &WeakLedger, key: &LeaderKey, leading: bool) {
    let lost = l.lost.notified();
    let (l2, key2) = (l.clone(), key.clone());
    // No strong handle of the ledger is held while leading: dropping the last one ends this.
    let took = match (leading, ledger.upgrade()) {
        (true, _) => Ok(Ok(())),
        (false, None) => return,
        (false, Some(led)) => tokio::task::spawn_blocking(move || take_lead(&led, &l2, &key2)).await,
    };

    if let Ok(Err(e)) | Err(e) = took.map_err(|e| Error::Unavailable(e.to_string())) {
        l.set_role(|r| {
            r.leading = None;
            r.leader_url = None;
            r.why_not = Some(format!("this copy won the election but could not take the lead: {e}"));
        });
        return;
    }
    lost.await;
    if let Some(led) = ledger.upgrade() {
        let _ = tokio::task::spawn_blocking(move || led.reload_from_files()).await;
    }
}

/// Resolves once the last handle of the ledger is gone (the copy then resigns and revokes
/// its lease, and the background tasks end).
async fn dropped(ledger: &WeakLedger) {
    while ledger.upgrade().is_some() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps the lease alive (every third of its TTL). A broken keep-alive stream (the etcd member
/// it ran through went away) is opened again, through whichever member answers, for as long
/// as the lease is surely still alive (its TTL counted from the last renewal *sent* that
/// etcd confirmed); only a lease that may have lapsed, or that etcd says is gone, steps the
/// copy down. Holding on that long is safe: the fence, not the lease, refuses a stale append.
async fn keep_alive(log: Weak<EtcdLog>, mut client: Client, lease_id: i64, ttl: i64) {
    let ttl = Duration::from_secs(u64::try_from(ttl).unwrap_or(5).max(1));
    let period = ttl / 3;
    // The lease was granted moments ago; count conservatively.
    let mut alive_until = tokio::time::Instant::now() + period;
    let mut stream = None;
    loop {
        let left = alive_until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            if let Some(l) = log.upgrade() {
                l.lose("lost the election lease: etcd did not renew it in time (no quorum, or this copy was paused)");
            }
            return;
        }
        let Some((keeper, messages)) = stream.as_mut() else {
            if let Ok(Ok(s)) = tokio::time::timeout(left, client.lease_keep_alive(lease_id)).await {
                stream = Some(s);
            } else {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            continue;
        };
        let sent = tokio::time::Instant::now();
        let renewed = match keeper.keep_alive().await {
            Ok(()) => tokio::time::timeout(left, messages.message()).await,
            Err(e) => Ok(Err(e)),
        };
        match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                alive_until = sent + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                if log.upgrade().is_none() {
                    return;
                }
                tokio::time::sleep(period).await;
            }
            Ok(Ok(Some(_))) => {
                if let Some(l) = log.upgrade() {
                    l.lose("lost the election lease: etcd says it expired (no quorum for too long, or this copy was paused)");
                }
                return;
            }
            // The stream broke or did not answer in time: open it again while the lease lasts.
            _ => {
                stream = None;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}
