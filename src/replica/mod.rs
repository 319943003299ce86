//! Replicated mode (feature `etcd`, docs/replication.md): the ledger's log on an etcd v3
//! cluster, with one active decider (the election's leader), hot standbys and fenced takeover.
//!
//! - [`etcd_log`]: the [`Replicator`](crate::log::backend::Replicator) the commit pipeline
//!   goes through: one fenced transaction per group-commit batch (split to etcd's limits).
//! - [`election`]: campaign, lease keep-alive, catch-up, leadership and stepping down.
//! - [`follower`]: every copy writes the committed records into its local segment files
//!   (from a watch; a compacted revision fails loudly and falls back to reading the range),
//!   publishes how far it got, and the leader trims the shared log behind every copy.
//!
//! Keys, under `/<cluster>/`: `log/<seq, 20 digits>` (one event's bytes each), `head` (the
//! last committed seq, decimal), `log-start` (the first seq still kept), `election` (the
//! election's prefix; the leader's value is its advertised URL), `replicas/<id>` (each copy's
//! applied and snapshot seqs, on its lease), `chain-off` (present when the first leader's log
//! predates the chain: copies then do not compare chain values).

pub mod election;
pub mod etcd_log;
pub mod follower;

use crate::ledger::{Ledger, OpenOptions, Replication};
use crate::log::chain::{ChainValue, CHAIN_BYTES};
use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How a copy of a replicated ledger joins its cluster ([`OpenOptions::etcd`]).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd client URLs (`http://127.0.0.1:2379`, ...).
    pub endpoints: Vec<String>,
    /// The cluster's name: every key lives under `/<cluster>/`.
    pub cluster: String,
    /// Where clients reach this copy (its `serve --http` URL): the election value, named to
    /// clients by the standbys ("not the leader, the leader is X").
    pub advertise_url: String,
    /// This copy's name under `replicas/` (retention waits for every copy listed there).
    pub replica_id: String,
    /// The election lease: a leader that stops renewing it for this long loses the election.
    pub lease_ttl_seconds: i64,
    /// How long one etcd request may take before the write fails ("no quorum").
    pub request_timeout: Duration,
    /// Delete log keys every copy has applied and snapshotted (docs/replication.md).
    pub retention: bool,
}

impl EtcdOptions {
    /// Options with the defaults: a 5 s lease, 5 s requests, retention on.
    pub fn new(endpoints: Vec<String>, cluster: impl Into<String>, advertise_url: impl Into<String>) -> EtcdOptions {
        let advertise_url = advertise_url.into();
        EtcdOptions {
            endpoints,
            cluster: cluster.into(),
            replica_id: advertise_url.replace(['/', ':'], "_"),
            advertise_url,
            lease_ttl_seconds: 5,
            request_timeout: Duration::from_secs(5),
            retention: true,
        }
    }
}

impl OpenOptions {
    /// Replicated mode: this open is one copy of a ledger whose log lives on the etcd cluster
    /// `etcd` names (docs/replication.md). The call returns once the local copy has caught up
    /// with the shared log; writes are served while this copy leads.
    pub fn etcd(mut self, etcd: EtcdOptions) -> Self {
        self.replication = Some(Arc::new(EtcdReplication(etcd)));
        self
    }
}

/// [`Replication`] on etcd.
#[derive(Debug)]
struct EtcdReplication(EtcdOptions);

impl Replication for EtcdReplication {
    fn open(&self, dir: &Path, opts: OpenOptions) -> Result<Ledger> {
        election::open(dir, opts, &self.0)
    }
}

/// Key names under `/<cluster>/`.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// The keys of cluster `cluster`.
    pub fn new(cluster: &str) -> Keys {
        Keys { root: format!("/{}/", cluster.trim_matches('/')) }
    }
    /// The record `seq`.
    pub fn log(&self, seq: u64) -> String {
        format!("{}log/{seq:020}", self.root)
    }
    /// The sequence number in a record key.
    pub fn seq_of(&self, key: &[u8]) -> Option<u64> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.log_prefix())?.parse().ok()
    }
    /// Every record key starts with it.
    pub fn log_prefix(&self) -> String {
        format!("{}log/", self.root)
    }
    /// The last committed sequence number.
    pub fn head(&self) -> String {
        format!("{}head", self.root)
    }
    /// The first sequence number still in etcd (retention).
    pub fn log_start(&self) -> String {
        format!("{}log-start", self.root)
    }
    /// Present when the first leader's log predates the chain (copies compare no values).
    pub fn chain_off(&self) -> String {
        format!("{}chain-off", self.root)
    }
    /// The election's name.
    pub fn election(&self) -> String {
        format!("{}election", self.root)
    }
    /// A copy's progress key.
    pub fn replica(&self, id: &str) -> String {
        format!("{}replicas/{id}", self.root)
    }
    /// Every progress key starts with it.
    pub fn replicas_prefix(&self) -> String {
        format!("{}replicas/", self.root)
    }
}

/// The first byte of a record's value in etcd that carries its writer's chain value (then the
/// 32 bytes of the value, then the payload). An event's payload is JSON and starts with `{`,
/// so a value without it is a bare payload (written by an older build: nothing to compare).
pub const CHAINED_VALUE: u8 = 0x01;

/// A record's value in etcd: its payload, behind its writer's chain value when it has one.
pub fn encode_value(chain: Option<&ChainValue>, payload: &[u8]) -> Vec<u8> {
    match chain {
        Some(c) => {
            let mut v = Vec::with_capacity(1 + CHAIN_BYTES + payload.len());
            v.push(CHAINED_VALUE);
            v.extend_from_slice(c.as_bytes());
            v.extend_from_slice(payload);
            v
        }
        None => payload.to_vec(),
    }
}

/// Reads a record's value in etcd ([`encode_value`]): the writer's chain value, if any, and
/// the payload.
pub fn decode_value(value: &[u8]) -> (Option<ChainValue>, &[u8]) {
    match value.split_first() {
        Some((&CHAINED_VALUE, rest)) if rest.len() >= CHAIN_BYTES => {
            let (chain, payload) = rest.split_at(CHAIN_BYTES);
            (<[u8; CHAIN_BYTES]>::try_from(chain).ok().map(ChainValue), payload)
        }
        _ => (None, value),
    }
}

/// Compares this copy's chain value at `seq` with the one the shared log carries for it:
/// `Err` (the copy refuses to serve) when they differ; nothing to compare when either is
/// unknown.
pub fn compare_chain(seq: u64, here: Option<ChainValue>, there: Option<ChainValue>) -> Result<()> {
    match (here, there) {
        (Some(here), Some(there)) if here != there => {
            Err(Error::Poisoned(crate::log::chain::diverged_reason(seq, &here, &there)))
        }
        _ => Ok(()),
    }
}

/// Reads an etcd error as the error a write gets.
pub(crate) fn etcd_error(what: &str, e: &etcd_client::Error) -> Error {
    Error::Unavailable(format!("no quorum: the shared log (etcd) did not answer {what}: {e}"))
}
