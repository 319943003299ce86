//! The recorded demand: each request as it arrived, rebuilt from the `granted` or `rejected`
//! event that recorded its outcome (both keep every field the request gave), and the log read
//! as a stream so that nothing holds all of its events.

use crate::domain::event::{Event, EventBody};
use crate::domain::input::ResourceRequest;
use crate::domain::model::AllocationId;
use crate::ledger::Ledger;
use crate::log::layout::WAL_DIR;
use crate::log::reader::{LogReader, LogRules, Wording};
use crate::Result;

/// The request behind a recorded outcome, and the id the ledger gave it; `None` for an event
/// that is not an outcome of a request.
///
/// The lifetime is the one decided (the request's own, or the config's default then), so the
/// request asks again for exactly what it got; the metadata is the stored object.
pub fn request_of(body: &EventBody) -> Option<(AllocationId, ResourceRequest)> {
    match body {
        EventBody::Granted(g) => Some((
            g.allocation_id,
            ResourceRequest {
                job_id: g.job_id.clone(),
                mcp_servers: g.mcp_servers.iter().map(|m| m.name.clone()).collect(),
                workers: g.resources.workers,
                priority: g.priority,
                ttl_seconds: Some(g.ttl_seconds),
                metadata: g.metadata.to_map(),
                idempotency_key: g.idempotency_key.as_deref().map(str::to_string),
                max_lifetime_seconds: g.max_lifetime_seconds,
                tenant: g.tenant.clone(),
                ..ResourceRequest::default()
            },
        )),
        EventBody::Rejected(r) => Some((
            r.allocation_id,
            ResourceRequest {
                job_id: r.job_id.clone(),
                mcp_servers: r.mcp_servers.clone(),
                workers: r.workers,
                priority: r.priority,
                ttl_seconds: Some(r.ttl_seconds),
                metadata: r.metadata.to_map(),
                idempotency_key: r.idempotency_key.as_deref().map(str::to_string),
                max_lifetime_seconds: r.max_lifetime_seconds,
                tenant: r.tenant.clone(),
                ..ResourceRequest::default()
            },
        )),
        _ => None,
    }
}

/// The tenant a request is for: the one recorded with its outcome, else (events written before
/// tenants were recorded) its metadata's `tenant` when that is a string.
pub fn tenant_of(req: &ResourceRequest) -> Option<&str> {
    req.tenant.as_deref().or_else(|| req.metadata.get("tenant").and_then(serde_json::Value::as_str))
}

/// Streams every durable event of the ledger's log, from its first, in order, checked by the
/// log's rules; `visit` returns false to stop. Memory: one event at a time.
pub fn stream_log(ledger: &Ledger, visit: &mut dyn FnMut(u64, Event) -> Result<bool>) -> Result<()> {
    let ((), upto) = ledger.with_durable_state(|_| ())?;
    if upto == 0 {
        return Ok(());
    }
    let wal_dir = ledger.dir().join(WAL_DIR);
    let reader = LogReader::new(&**ledger.storage(), &wal_dir).upto(upto);
    let mut rules = LogRules::from_start();
    let mut failed = None;
    reader.events(&mut rules, Wording::Open, &mut |pos, ev| match visit(pos.seq, ev) {
        Ok(go_on) => Ok(go_on && pos.seq < upto),
        Err(e) => {
            failed = Some(e);
            Ok(false)
        }
    })?;
    failed.map_or(Ok(()), Err)
}
