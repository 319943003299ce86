//! Every decision: a command is validated and decided against the current state, and the
//! result is the event that records its outcome (which slots, which endpoints, which deadline).
//! Replay never runs these; it folds the events they returned.

use crate::domain::clock::Micros;
use crate::domain::config::{validate_mcp_name, Config, MAX_MCP_SERVERS_PER_REQUEST};
use crate::domain::event::{EventBody, Grant, McpGrant, RejectReason, Rejection, WorkerGrant};
use crate::domain::input::{metadata_key_allowed, validate_job_id, ResourceRequest};
use crate::domain::model::{cores, truncate, AllocationId, AllocationState, Metadata, Priority, Resources};
use crate::domain::state::{Allocation, State};
use crate::report::*;
use crate::{Error, Result};
use std::collections::BTreeSet;

impl State {
    /// Validates a request and decides it against this state at `now` (the event's timestamp).
    /// Invalid input is an error and no event; a request the pool cannot hold is a `Rejected`
    /// event. The caller must have written pending expiries first.
    pub fn decide_request(&self, req: &ResourceRequest, now: Micros, id: AllocationId) -> Result<EventBody> {
        let cfg = &self.config;
        validate_job_id("job_id", &req.job_id)?;
        if req.mcp_servers.len() > MAX_MCP_SERVERS_PER_REQUEST {
            return Err(Error::invalid(
                "mcp_servers",
                format!("{} names given; at most {MAX_MCP_SERVERS_PER_REQUEST} are allowed", req.mcp_servers.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in req.mcp_servers.iter().enumerate() {
            validate_mcp_name(&format!("mcp_servers[{i}]"), name)?;
            if !seen.insert(name.as_str()) {
                return Err(Error::invalid(
                    format!("mcp_servers[{i}]"),
                    format!("{name:?} is listed twice; name each MCP server once"),
                ));
            }
            if cfg.strict_mcp_catalog && !cfg.mcp_catalog.contains_key(name) {
                let known: Vec<&str> = cfg.mcp_catalog.keys().map(String::as_str).collect();
                return Err(Error::invalid(
                    format!("mcp_servers[{i}]"),
                    format!(
                        "{name:?} is not in the MCP catalog; known servers: {}",
                        if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
                    ),
                ));
            }
        }
        if req.workers > cfg.worker_slots {
            return Err(Error::invalid(
                "workers",
                format!(
                    "{} exceeds the pool of {} workers; allowed values: 0 to {}",
                    req.workers, cfg.worker_slots, cfg.worker_slots
                ),
            ));
        }
        if req.workers == 0 && req.mcp_servers.is_empty() {
            return Err(Error::invalid(
                "workers",
                "the request asks for nothing: ask for at least 1 worker or name at least one MCP server in mcp_servers",
            ));
        }
        let ttl_seconds = req.ttl_seconds.unwrap_or(cfg.default_ttl_seconds);
        if ttl_seconds < cfg.min_ttl_seconds || ttl_seconds > cfg.max_ttl_seconds {
            return Err(Error::invalid(
                "ttl_seconds",
                format!(
                    "{ttl_seconds} is out of range; allowed values: {} to {} seconds",
                    cfg.min_ttl_seconds, cfg.max_ttl_seconds
                ),
            ));
        }
        let metadata = Metadata::from_map(&req.metadata);
        let metadata_bytes = metadata.as_json().len();
        if metadata_bytes > cfg.max_metadata_bytes {
            return Err(Error::invalid(
                "metadata",
                format!("is {metadata_bytes} bytes as JSON; at most {} bytes are allowed", cfg.max_metadata_bytes),
            ));
        }
        for key in req.metadata.keys() {
            if !metadata_key_allowed(key) {
                return Err(Error::invalid(
                    "metadata",
                    format!(
                        "key {:?} is not allowed: keys are 1 to 128 characters without control characters",
                        truncate(key)
                    ),
                ));
            }
        }

        // Which MCP servers this grant would start, and at what endpoint and cost.
        let mut mcp = Vec::with_capacity(req.mcp_servers.len());
        let mut next_assigned = self.assigned_mcp_count;
        let mut server_cost = Resources::default();
        for name in &req.mcp_servers {
            let (endpoint, cpu, mem, assigned) = if let Some(r) = self.running.get(name) {
                (r.endpoint.clone(), r.cpu_millicores, r.memory_mib, false)
            } else if let Some(e) = cfg.mcp_catalog.get(name) {
                (e.endpoint.clone(), e.cpu_millicores, e.memory_mib, false)
            } else if let Some(e) = self.assigned_mcp_endpoints.get(name) {
                (e.clone(), 0, 0, false)
            } else {
                let port = u64::from(cfg.mcp_base_port) + next_assigned;
                next_assigned += 1;
                (format!("http://localhost:{port}"), 0, 0, true)
            };
            let started = !self.running.contains_key(name);
            if started {
                server_cost.cpu_millicores += cpu;
                server_cost.memory_mib += mem;
            }
            mcp.push(McpGrant {
                name: name.clone(),
                endpoint,
                cpu_millicores: cpu,
                memory_mib: mem,
                assigned,
                started,
            });
        }

        let worker_res = Resources {
            cpu_millicores: cfg.worker_cpu_millicores * u64::from(req.workers),
            memory_mib: cfg.worker_memory_mib * u64::from(req.workers),
            workers: req.workers,
        };
        let needed = worker_res.checked_add(server_cost).expect("bounded by config limits");
        let avail = self.available();
        let total = self.total();
        let pct = match req.priority {
            Priority::Low => cfg.priority_reserve_percent.low,
            Priority::Normal => cfg.priority_reserve_percent.normal,
            Priority::High => cfg.priority_reserve_percent.high,
            Priority::Critical => cfg.priority_reserve_percent.critical,
        } as u64;
        let reserve = |t: u64| (t * pct).div_ceil(100);
        let usable = |a: u64, t: u64| a.saturating_sub(reserve(t));
        let note = |t: u64| {
            if pct > 0 {
                format!(" ({} of {t} kept free from {} priority requests)", reserve(t), req.priority)
            } else {
                String::new()
            }
        };
        let workers_usable = usable(u64::from(avail.workers), u64::from(total.workers));
        let cpu_usable = usable(avail.cpu_millicores, total.cpu_millicores);
        let mem_usable = usable(avail.memory_mib, total.memory_mib);
        let rejection = if u64::from(needed.workers) > workers_usable {
            Some((
                RejectReason::InsufficientWorkers,
                u64::from(needed.workers),
                workers_usable,
                format!(
                    "Insufficient workers: requested {}, available {workers_usable}{}",
                    needed.workers,
                    note(u64::from(total.workers))
                ),
            ))
        } else if needed.cpu_millicores > cpu_usable {
            Some((
                RejectReason::InsufficientCpu,
                needed.cpu_millicores,
                cpu_usable,
                format!(
                    "Insufficient CPU: needed {:?}, available {:?}{}",
                    cores(needed.cpu_millicores),
                    cores(cpu_usable),
                    note(total.cpu_millicores)
                ),
            ))
        } else if needed.memory_mib > mem_usable {
            Some((
                RejectReason::InsufficientMemory,
                needed.memory_mib,
                mem_usable,
                format!(
                    "Insufficient memory: needed {}MB, available {mem_usable}MB{}",
                    needed.memory_mib,
                    note(total.memory_mib)
                ),
            ))
        } else {
            None
        };
        if let Some((reason, needed, available, error)) = rejection {
            return Ok(EventBody::Rejected(Rejection {
                allocation_id: id,
                job_id: req.job_id.clone(),
                priority: req.priority,
                ttl_seconds,
                workers: req.workers,
                mcp_servers: req.mcp_servers.clone(),
                reason,
                needed,
                available,
                error,
                metadata,
            }));
        }

        let workers = self
            .free_slots
            .iter()
            .take(req.workers as usize)
            .map(|&slot| WorkerGrant {
                slot,
                worker_id: cfg.worker_id(slot),
                endpoint: cfg.worker_endpoint(slot),
                cpu_millicores: cfg.worker_cpu_millicores,
                memory_mib: cfg.worker_memory_mib,
            })
            .collect::<Vec<_>>();
        debug_assert_eq!(workers.len(), req.workers as usize);
        Ok(EventBody::Granted(Grant {
            allocation_id: id,
            job_id: req.job_id.clone(),
            priority: req.priority,
            ttl_seconds,
            deadline_us: now + (ttl_seconds as i64) * 1_000_000,
            workers,
            mcp_servers: mcp,
            resources: worker_res,
            metadata,
        }))
    }

    /// Validates a config change against what is held now.
    pub fn decide_config_change(&self, config: Config) -> Result<EventBody> {
        config.validate()?;
        if let Some(slot) = self.slots.iter().rposition(Option::is_some) {
            if slot as u32 >= config.worker_slots {
                return Err(Error::invalid(
                    "config.worker_slots",
                    format!("worker slot {slot} is held by an active allocation; worker_slots must stay above it"),
                ));
            }
        }
        if config.total_cpu_millicores < self.allocated.cpu_millicores
            || config.total_memory_mib < self.allocated.memory_mib
        {
            return Err(Error::invalid("config", "the new totals are below what active allocations hold now"));
        }
        Ok(EventBody::ConfigChanged { config })
    }
}

/// `request_resources` decided against `state` at `ts`: the event and the caller's report.
pub(crate) fn decide_request_outcome(
    state: &State,
    ts: Micros,
    req: &ResourceRequest,
) -> Result<(Vec<EventBody>, RequestOutcome)> {
    let mut id = AllocationId::for_seq(AllocationId::ledger_key(&state.ledger_id), state.last_seq + 1);
    // Only a ledger written by an older build (random ids) can hold this one already.
    while state.allocation(id).is_some() {
        id = AllocationId::random();
    }
    let body = state.decide_request(req, ts, id)?;
    let outcome = match &body {
        EventBody::Granted(g) => RequestOutcome::Granted(GrantReport {
            allocation_id: g.allocation_id,
            status: AllocationState::Active,
            job_id: g.job_id.clone(),
            priority: g.priority,
            mcp_servers: g
                .mcp_servers
                .iter()
                .map(|m| McpServerInfo { name: m.name.clone(), endpoint: m.endpoint.clone(), status: "running".into() })
                .collect(),
            workers_allocated: g
                .workers
                .iter()
                .map(|w| WorkerInfo {
                    worker_id: w.worker_id.clone(),
                    endpoint: w.endpoint.clone(),
                    cpu: cores(w.cpu_millicores),
                    memory: w.memory_mib,
                    cpu_millicores: w.cpu_millicores,
                    memory_mib: w.memory_mib,
                })
                .collect(),
            resources: GrantedResources {
                cpu: cores(g.resources.cpu_millicores),
                memory: g.resources.memory_mib,
                workers: g.resources.workers,
                cpu_millicores: g.resources.cpu_millicores,
                memory_mib: g.resources.memory_mib,
            },
            ttl_seconds: g.ttl_seconds,
            created_at: crate::domain::clock::format_micros(ts),
            expires_at: crate::domain::clock::format_micros(g.deadline_us),
            seq: state.last_seq + 1,
        }),
        EventBody::Rejected(r) => RequestOutcome::Failed(FailedReport {
            allocation_id: r.allocation_id,
            status: AllocationState::Failed,
            error: r.error.clone(),
            job_id: r.job_id.clone(),
            reason: r.reason.as_str().into(),
            created_at: crate::domain::clock::format_micros(ts),
            seq: state.last_seq + 1,
        }),
        _ => unreachable!("decide_request returns a grant or a rejection"),
    };
    Ok((vec![body], outcome))
}

/// `release_resources` decided against `state` at `ts`. An unknown id (which may have ended
/// long ago and left memory) is `NotFound`; an ended one is reported and nothing is written.
pub(crate) fn decide_release(state: &State, ts: Micros, id: AllocationId) -> Result<(Vec<EventBody>, ReleaseReport)> {
    let a = state.allocation(id).ok_or_else(|| Error::NotFound(id.to_string()))?;
    let held_seconds = |end: Micros| (end - a.created_us).max(0) as f64 / 1e6;
    if a.state == AllocationState::Active {
        let report = ReleaseReport {
            status: "released".into(),
            allocation_id: id,
            job_id: a.job_id.clone(),
            state: AllocationState::Released,
            workers_released: a.resources.workers,
            cpu_freed: cores(a.resources.cpu_millicores),
            memory_freed: a.resources.memory_mib,
            released_at: Some(crate::domain::clock::format_micros(ts)),
            expired_at: None,
            duration_seconds: held_seconds(ts),
        };
        return Ok((vec![EventBody::Released { allocation_id: id }], report));
    }
    Ok((Vec::new(), already_ended_report(a)))
}

/// `release_resources` of an allocation that has already ended: nothing is written.
pub(crate) fn already_ended_report(a: &Allocation) -> ReleaseReport {
    let ended = a.ended_us.unwrap_or(a.created_us);
    ReleaseReport {
        status: format!("already_{}", a.state.as_str()),
        allocation_id: a.id,
        job_id: a.job_id.clone(),
        state: a.state,
        workers_released: 0,
        cpu_freed: 0.0,
        memory_freed: 0,
        released_at: (a.state == AllocationState::Released).then(|| crate::domain::clock::format_micros(ended)),
        expired_at: (a.state == AllocationState::Expired).then(|| crate::domain::clock::format_micros(ended)),
        duration_seconds: (a.held_until() - a.created_us).max(0) as f64 / 1e6,
    }
}
