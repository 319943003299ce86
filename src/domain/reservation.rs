//! Advance reservations: capacity held for a future window `[start, end)` for one holder, a
//! tenant or a job. During the window only the holder may allocate from the reserved part
//! (everyone else sees the pool less the part the holder does not use); before it, a grant or
//! renewal whose deadline reaches into the window is made only if it fits beside it.
//!
//! A reservation holds workers; their CPU and memory follow from the pool's worker shape
//! (`worker_cpu_millicores`, `worker_memory_mib`) and are held too. MCP servers are not
//! reserved: they are shared and started on demand, and their cost is charged to the pool like
//! any grant's.
//!
//! **The rule** (checked for every reservation, grant and renewal; decided here, recorded as
//! events, never decided again on replay): at every instant `t`,
//!
//! ```text
//! held(t) + Σ unused(t) ≤ pool
//! ```
//!
//! per resource (workers, CPU, memory), where `held(t)` is what the active allocations whose
//! deadline is after `t` hold (running MCP servers counted as running throughout), and
//! `unused(t)` is, for each reservation in force at `t`, what its holder's allocations alive at
//! `t` do not use of it. An allocation counts toward its job's reservations first, then toward
//! its tenant's. The left side only rises at a reservation's start, so the rule is checked at
//! the start of the interval a decision changes and at every reservation start inside it.

use crate::domain::clock::{format_micros, Micros, MICROS_PER_SECOND};
use crate::domain::decide::Cost;
use crate::domain::event::{RejectReason, Rejection};
use crate::domain::input::ValidRequest;
use crate::domain::model::{AllocationId, AllocationState, Resources};
use crate::domain::state::{Allocation, State};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// `resv-` followed by 12 lowercase hex digits, derived from the sequence number of the event
/// that decided the reservation (unique by construction, like allocation ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(u64);

impl ReservationId {
    /// The id of the reservation decided by the event at `seq` of the ledger `ledger_id`.
    pub fn for_seq(ledger_id: &str, seq: u64) -> Self {
        ReservationId(AllocationId::for_seq(AllocationId::ledger_key(ledger_id), seq).as_u64())
    }

    /// Parses an id given by a caller; the error names `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        text.parse().map_err(|()| {
            let shown: String = text.chars().take(40).collect();
            Error::invalid(
                field,
                format!("{shown:?} is not a reservation id: expected `resv-` followed by 12 lowercase hex digits, e.g. resv-1a2b3c4d5e6f"),
            )
        })
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resv-{:012x}", self.0)
    }
}

impl std::str::FromStr for ReservationId {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let hex = s.strip_prefix("resv-").ok_or(())?;
        if hex.len() != 12 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(());
        }
        u64::from_str_radix(hex, 16).map(ReservationId).map_err(|_| ())
    }
}

impl Serialize for ReservationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReservationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(|()| serde::de::Error::custom(format!("invalid reservation id {s:?}")))
    }
}

/// A reservation as the `reserved` event records it and the state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Its id.
    pub reservation_id: ReservationId,
    /// The tenant it holds capacity for (exactly one of `tenant` and `job_id` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The job it holds capacity for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// What it holds: workers, and their CPU and memory by the pool's worker shape.
    pub resources: Resources,
    /// When the window opens (never before the event that decided it).
    pub start_us: Micros,
    /// When the window closes: from then on it holds nothing (no event marks it).
    pub end_us: Micros,
}

impl Reservation {
    /// Whether its window holds `t`.
    pub fn in_force_at(&self, t: Micros) -> bool {
        self.start_us <= t && t < self.end_us
    }

    /// "tenant team-a" or "job train-7", for messages.
    pub fn holder_text(&self) -> String {
        holder_text(self.tenant.as_deref(), self.job_id.as_deref())
    }

    /// Whether an allocation of `job_id` for `tenant` may use it.
    pub fn held_by(&self, job_id: &str, tenant: Option<&str>) -> bool {
        match (&self.job_id, &self.tenant) {
            (Some(j), _) => j == job_id,
            (None, Some(t)) => tenant == Some(t.as_str()),
            (None, None) => false,
        }
    }
}

fn holder_text(tenant: Option<&str>, job_id: Option<&str>) -> String {
    match (tenant, job_id) {
        (Some(t), _) => format!("tenant {t}"),
        (None, Some(j)) => format!("job {j}"),
        (None, None) => "nobody".to_string(),
    }
}

/// A reservation that could not be honoured: recorded (`reservation_rejected`) so the audit
/// trail says why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRejection {
    /// The id it would have had.
    pub reservation_id: ReservationId,
    /// The tenant it was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The job it was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// What it asked for.
    pub resources: Resources,
    /// The window asked for.
    pub start_us: Micros,
    /// The window's end.
    pub end_us: Micros,
    /// The first instant at which it would not fit.
    pub conflict_at_us: Micros,
    /// `workers`, `cpu_millicores` or `memory_mib`: the resource that ran short.
    pub resource: String,
    /// What it needed of that resource.
    pub needed: u64,
    /// What was left of it at `conflict_at_us`.
    pub available: u64,
    /// Why, in words.
    pub error: String,
}

/// A reservation as asked for (CLI, MCP, library); checked and resolved against the clock by
/// [`State::decide_reservation`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationRequest {
    /// The tenant to hold capacity for (exactly one of `tenant` and `job_id`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// The job to hold capacity for.
    #[serde(default)]
    pub job_id: Option<String>,
    /// Worker slots to hold (their CPU and memory by the pool's worker shape).
    #[serde(default)]
    pub workers: u32,
    /// When the window opens: RFC 3339, `now`, or relative (`+2h`); default now.
    #[serde(default)]
    pub start: Option<String>,
    /// When the window closes: RFC 3339 or relative.
    #[serde(default)]
    pub end: Option<String>,
    /// The window opens this many seconds from now (instead of `start`).
    #[serde(default)]
    pub start_in_seconds: Option<u64>,
    /// The window lasts this many seconds (instead of `end`).
    #[serde(default)]
    pub duration_seconds: Option<u64>,
}

impl ReservationRequest {
    /// A request for `workers` workers for `tenant`.
    pub fn for_tenant(tenant: impl Into<String>, workers: u32) -> Self {
        ReservationRequest { tenant: Some(tenant.into()), workers, ..Self::default() }
    }

    /// A request for `workers` workers for job `job_id`.
    pub fn for_job(job_id: impl Into<String>, workers: u32) -> Self {
        ReservationRequest { job_id: Some(job_id.into()), workers, ..Self::default() }
    }

    /// The window as seconds from now: opens in `start_in_seconds`, lasts `duration_seconds`.
    #[must_use]
    pub fn window_seconds(mut self, start_in_seconds: u64, duration_seconds: u64) -> Self {
        self.start_in_seconds = Some(start_in_seconds);
        self.duration_seconds = Some(duration_seconds);
        self
    }
}

/// Reserved capacity at an instant, for `capacity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedAt {
    /// What the reservations in force hold in all.
    pub reserved: Resources,
    /// What their holders do not use of it (kept from everyone else).
    pub unused: Resources,
    /// The reservations in force, by start.
    pub reservations: Vec<ReservationId>,
}

fn min_res(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.min(b.cpu_millicores),
        memory_mib: a.memory_mib.min(b.memory_mib),
        workers: a.workers.min(b.workers),
    }
}

fn sub_res(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.saturating_sub(b.cpu_millicores),
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
        workers: a.workers.saturating_sub(b.workers),
    }
}

fn add_res(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.saturating_add(b.cpu_millicores),
        memory_mib: a.memory_mib.saturating_add(b.memory_mib),
        workers: a.workers.saturating_add(b.workers),
    }
}

/// One holding as the rule sees it: what it holds, whose it is, until when.
#[derive(Debug, Clone, Copy)]
struct Hold<'a> {
    job_id: &'a str,
    tenant: Option<&'a str>,
    /// What it holds that counts toward a reservation (its workers' share).
    resources: Resources,
    until: Micros,
}

/// A change the rule is checked for: a new or longer holding, or a new reservation.
#[derive(Debug, Clone, Copy)]
struct Change<'a> {
    /// A holding that is new (or, renewed, replaces `replaces`).
    hold: Option<Hold<'a>>,
    /// What the holding adds beyond its workers (MCP servers it starts).
    extra: Resources,
    /// The allocation whose old holding `hold` replaces.
    replaces: Option<AllocationId>,
    /// A new reservation.
    reservation: Option<&'a Reservation>,
}

/// The first instant of `[from, until)` at which the rule would fail, with the resource,
/// what the change needs of it and what is left.
#[derive(Debug, Clone)]
pub(crate) struct Breach {
    at: Micros,
    resource: &'static str,
    pub(crate) needed: u64,
    pub(crate) available: u64,
}

/// The reservations the state keeps: in force or upcoming as of the last event (one whose end
/// has passed is dropped as events pass it; one cancelled, by its event).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations {
    by_id: BTreeMap<ReservationId, Reservation>,
}

impl Reservations {
    /// From a snapshot's list.
    pub fn from_list(list: Vec<Reservation>) -> Self {
        Reservations { by_id: list.into_iter().map(|r| (r.reservation_id, r)).collect() }
    }

    /// Every reservation kept, by id.
    pub fn list(&self) -> Vec<Reservation> {
        self.by_id.values().cloned().collect()
    }

    /// The reservation `id`, if kept.
    pub fn get(&self, id: ReservationId) -> Option<&Reservation> {
        self.by_id.get(&id)
    }

    /// Folds a `reserved` event; false (an anomaly) if the id is taken or the window empty.
    pub fn add(&mut self, r: Reservation) -> bool {
        if self.by_id.contains_key(&r.reservation_id) || r.start_us >= r.end_us {
            return false;
        }
        self.by_id.insert(r.reservation_id, r);
        true
    }

    /// Folds a `reservation_cancelled` event; false (an anomaly) if it is not kept.
    pub fn cancel(&mut self, id: ReservationId) -> bool {
        self.by_id.remove(&id).is_some()
    }

    /// Drops the reservations whose window has closed by `t` (an event's timestamp).
    pub fn forget_over(&mut self, t: Micros) {
        if self.by_id.values().any(|r| r.end_us <= t) {
            self.by_id.retain(|_, r| r.end_us > t);
        }
    }

    /// In force or upcoming at `now`, by start then id.
    pub fn current(&self, now: Micros) -> Vec<&Reservation> {
        let mut v: Vec<&Reservation> = self.by_id.values().filter(|r| r.end_us > now).collect();
        v.sort_by_key(|r| (r.start_us, r.reservation_id));
        v
    }

    /// Whether any window overlaps `[from, until)`.
    fn any_overlapping(&self, from: Micros, until: Micros) -> bool {
        self.by_id.values().any(|r| r.start_us < until && r.end_us > from)
    }
}

/// The pool as the rule counts it: slots that take grants (neither drained nor removed), and
/// the CPU and memory totals.
fn pool_of(state: &State) -> Resources {
    let c = &state.config;
    Resources {
        cpu_millicores: c.total_cpu_millicores,
        memory_mib: c.total_memory_mib,
        workers: c.in_pool_slots().saturating_sub(c.drained_workers.len() as u32),
    }
}

/// What an allocation holds as the rule counts it: its CPU and memory, and its slots that take
/// grants (a drained slot leaves the pool when freed, so it is counted on neither side).
fn held_by(state: &State, a: &Allocation) -> Resources {
    let workers = a.workers.iter().filter(|w| state.config.grantable(w.slot)).count() as u32;
    Resources { workers, ..a.resources }
}

/// What running MCP servers hold (counted as held throughout: they stop only when their users
/// end, which can only make room).
fn servers_held(state: &State) -> Resources {
    state.running_servers().values().fold(Resources::default(), |acc, r| {
        add_res(acc, Resources { cpu_millicores: r.cpu_millicores, memory_mib: r.memory_mib, workers: 0 })
    })
}

impl State {
    /// The reservations in force or upcoming at `now`, by start.
    pub fn reservations_at(&self, now: Micros) -> Vec<&Reservation> {
        self.reservations.current(now)
    }

    /// The reservation `id`, if it is in force or upcoming as of the last event.
    pub fn reservation(&self, id: ReservationId) -> Option<&Reservation> {
        self.reservations.get(id)
    }

    /// Reserved capacity at `now`: what the reservations in force hold and what their holders
    /// leave unused (`None`: none in force).
    pub fn reserved_at(&self, now: Micros) -> Option<ReservedAt> {
        let in_force: Vec<&Reservation> =
            self.reservations_at(now).into_iter().filter(|r| r.in_force_at(now)).collect();
        if in_force.is_empty() {
            return None;
        }
        let reserved = in_force.iter().fold(Resources::default(), |acc, r| add_res(acc, r.resources));
        let holds = self.holds_alive(now, None);
        let unused = unused_at(&in_force, holds.iter());
        Some(ReservedAt { reserved, unused, reservations: in_force.iter().map(|r| r.reservation_id).collect() })
    }

    /// The active allocations alive at `t` (deadline after it), but `skip`.
    fn holds_alive(&self, t: Micros, skip: Option<AllocationId>) -> Vec<Hold<'_>> {
        let mut v: Vec<Hold<'_>> = self
            .allocations()
            .filter(|a| a.state == AllocationState::Active && a.deadline_us > t && Some(a.id) != skip)
            .map(|a| Hold {
                job_id: &a.job_id,
                tenant: a.tenant.as_deref(),
                resources: held_by(self, a),
                until: a.deadline_us,
            })
            .collect();
        // Absorption is order-independent in total; sorted anyway so nothing depends on the
        // table's order.
        v.sort_by(|a, b| (a.until, a.job_id).cmp(&(b.until, b.job_id)));
        v
    }

    /// The first instant in `[from, until)` at which `change` would break the rule.
    fn first_breach(&self, from: Micros, until: Micros, change: &Change<'_>) -> Option<Breach> {
        let mut reservations: Vec<&Reservation> = self.reservations.by_id.values().collect();
        if let Some(r) = change.reservation {
            reservations.push(r);
        }
        let mut checkpoints: Vec<Micros> =
            reservations.iter().map(|r| r.start_us).filter(|&s| s > from && s < until).collect();
        checkpoints.push(from);
        checkpoints.sort_unstable();
        checkpoints.dedup();
        let pool = pool_of(self);
        let servers = servers_held(self);
        for t in checkpoints {
            let mut holds = self.holds_alive(t, change.replaces);
            holds.extend(change.hold.filter(|h| h.until > t));
            let held = holds.iter().fold(servers, |acc, h| add_res(acc, h.resources));
            let held = add_res(held, change.extra);
            let in_force: Vec<&Reservation> = reservations.iter().copied().filter(|r| r.in_force_at(t)).collect();
            let total = add_res(held, unused_at(&in_force, holds.iter()));
            let needed = change
                .reservation
                .map(|r| r.resources)
                .or(change.hold.map(|h| add_res(h.resources, change.extra)))
                .unwrap_or_default();
            let over = [
                ("workers", u64::from(total.workers), u64::from(pool.workers), u64::from(needed.workers)),
                ("cpu_millicores", total.cpu_millicores, pool.cpu_millicores, needed.cpu_millicores),
                ("memory_mib", total.memory_mib, pool.memory_mib, needed.memory_mib),
            ];
            if let Some(&(resource, total, pool, needed)) = over.iter().find(|(_, total, pool, _)| total > pool) {
                return Some(Breach { at: t, resource, needed, available: needed.saturating_sub(total - pool) });
            }
        }
        None
    }

    /// The reservation rule for a lease of `cost` by `job_id` (of `tenant`) over `[now, until)`:
    /// `None` if it fits beside the reservations, else where it breaches and the message naming
    /// the reservation in the way (shared by new requests and the queue's grants).
    pub(crate) fn reserved_breach(
        &self,
        job_id: &str,
        tenant: Option<&str>,
        cost: &Cost,
        now: Micros,
        until: Micros,
    ) -> Option<(Breach, String)> {
        if !self.reservations.any_overlapping(now, until) {
            return None;
        }
        let hold = Hold { job_id, tenant, resources: cost.workers, until };
        let change =
            Change { hold: Some(hold), extra: sub_res(cost.needed, cost.workers), replaces: None, reservation: None };
        let breach = self.first_breach(now, until, &change)?;
        let error = self.breach_message(&breach, job_id, tenant, now, Some(until));
        Some((breach, error))
    }

    /// The reservation rule for a grant that fits the pool now: `None` if it may be made, or
    /// the rejection (reason `reserved`) naming the reservation in the way and its window.
    pub fn reserved_rejection(
        &self,
        valid: &ValidRequest<'_>,
        cost: &Cost,
        now: Micros,
        id: AllocationId,
    ) -> Option<Rejection> {
        let until = now.saturating_add((valid.ttl_seconds as i64).saturating_mul(MICROS_PER_SECOND));
        let req = valid.request;
        let (breach, error) = self.reserved_breach(&req.job_id, valid.tenant.as_deref(), cost, now, until)?;
        Some(valid.rejection(id, RejectReason::Reserved, breach.needed, breach.available, error))
    }

    /// The reservation rule for a renewal of `a` to `deadline_us` at `now`: an error naming
    /// `ttl_seconds` and the reservation if the longer lease would reach into a window it does
    /// not fit beside.
    pub fn check_renewal_reservations(&self, a: &Allocation, deadline_us: Micros, now: Micros) -> Result<()> {
        let from = a.deadline_us.max(now);
        if deadline_us <= from || !self.reservations.any_overlapping(from, deadline_us) {
            return Ok(());
        }
        let hold =
            Hold { job_id: &a.job_id, tenant: a.tenant.as_deref(), resources: held_by(self, a), until: deadline_us };
        let change = Change { hold: Some(hold), extra: Resources::default(), replaces: Some(a.id), reservation: None };
        let Some(breach) = self.first_breach(from, deadline_us, &change) else { return Ok(()) };
        let why = self.breach_message(&breach, &a.job_id, a.tenant.as_deref(), now, None);
        let most = (breach.at.saturating_since(now) / MICROS_PER_SECOND).max(0);
        Err(Error::invalid(
            "ttl_seconds",
            format!(
                "renewing {} to {} would reach into reserved capacity: {why}; renew with ttl_seconds of at most {most} so it ends before then, or release it and request again",
                a.id,
                format_micros(deadline_us)
            ),
        ))
    }

    /// The rejection message: what was short, when, and the reservations in force then that
    /// the requester does not hold.
    /// `until`: the lease a grant would get, for the hint to end it before the window.
    fn breach_message(
        &self,
        b: &Breach,
        job_id: &str,
        tenant: Option<&str>,
        now: Micros,
        until: Option<Micros>,
    ) -> String {
        let others: Vec<String> = self
            .reservations
            .current(now)
            .into_iter()
            .filter(|r| r.in_force_at(b.at) && !r.held_by(job_id, tenant))
            .map(|r| {
                format!(
                    "{} reserves {} workers for {} from {} to {}",
                    r.reservation_id,
                    r.resources.workers,
                    r.holder_text(),
                    format_micros(r.start_us),
                    format_micros(r.end_us)
                )
            })
            .collect();
        let when = if b.at <= now { "now".to_string() } else { format!("at {}", format_micros(b.at)) };
        let lease = match until {
            Some(until) if b.at > now => format!(
                " (the lease would last until {}; end it before {} or ask for less)",
                format_micros(until),
                format_micros(b.at)
            ),
            _ => String::new(),
        };
        format!(
            "Insufficient {} outside reservations: requested {}, available {} {when}{lease}; {}",
            b.resource.trim_end_matches("_millicores").trim_end_matches("_mib"),
            b.needed,
            b.available,
            if others.is_empty() { "the pool is reserved".to_string() } else { others.join("; ") }
        )
    }
}

/// What the reservations `in_force` hold that the holdings `holds` (alive at the instant) do
/// not use: each holding fills its job's reservations first, then its tenant's.
fn unused_at<'a>(in_force: &[&Reservation], holds: impl Iterator<Item = &'a Hold<'a>>) -> Resources {
    if in_force.is_empty() {
        return Resources::default();
    }
    let mut by_job: BTreeMap<&str, Resources> = BTreeMap::new();
    let mut by_tenant: BTreeMap<&str, Resources> = BTreeMap::new();
    for r in in_force {
        let slot = match (&r.job_id, &r.tenant) {
            (Some(j), _) => by_job.entry(j.as_str()).or_default(),
            (None, Some(t)) => by_tenant.entry(t.as_str()).or_default(),
            (None, None) => continue,
        };
        *slot = add_res(*slot, r.resources);
    }
    for h in holds {
        let mut rest = h.resources;
        if let Some(left) = by_job.get_mut(h.job_id) {
            let take = min_res(*left, rest);
            *left = sub_res(*left, take);
            rest = sub_res(rest, take);
        }
        if let Some(left) = h.tenant.and_then(|t| by_tenant.get_mut(t)) {
            let take = min_res(*left, rest);
            *left = sub_res(*left, take);
        }
    }
    by_job.values().chain(by_tenant.values()).fold(Resources::default(), |acc, &r| add_res(acc, r))
}

/// A reservation request resolved against the clock: the holder, what it holds, the window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    tenant: Option<String>,
    job_id: Option<String>,
    resources: Resources,
    start_us: Micros,
    end_us: Micros,
}

fn seconds_us(field: &str, seconds: u64) -> Result<i64> {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(MICROS_PER_SECOND))
        .ok_or_else(|| Error::invalid(field, format!("{seconds} is too large")))
}

impl ReservationRequest {
    /// The holder: exactly one of `tenant` and `job_id`, each a valid name.
    fn holder(&self) -> Result<(Option<String>, Option<String>)> {
        match (&self.tenant, &self.job_id) {
            (Some(t), None) => {
                crate::domain::quota::validate_tenant("tenant", t)?;
                Ok((Some(t.clone()), None))
            }
            (None, Some(j)) => {
                crate::domain::input::validate_job_id("job_id", j)?;
                Ok((None, Some(j.clone())))
            }
            (Some(_), Some(_)) => {
                Err(Error::invalid("tenant", "give exactly one holder: `tenant` or `job_id`, not both"))
            }
            (None, None) => Err(Error::invalid("tenant", "a reservation needs a holder: give `tenant` or `job_id`")),
        }
    }

    /// The window `[start, end)` at `now`: a start in the past means now.
    fn window(&self, now: Micros) -> Result<(Micros, Micros)> {
        let start = match (&self.start, self.start_in_seconds) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("start", "give `start` or `start_in_seconds`, not both"));
            }
            (Some(text), None) => crate::domain::clock::parse_time("start", text, now)?,
            (None, Some(s)) => now.saturating_add(seconds_us("start_in_seconds", s)?),
            (None, None) => now,
        }
        .max(now);
        let end = match (&self.end, self.duration_seconds) {
            (Some(_), Some(_)) => return Err(Error::invalid("end", "give `end` or `duration_seconds`, not both")),
            (Some(text), None) => crate::domain::clock::parse_time("end", text, now)?,
            (None, Some(0)) => return Err(Error::invalid("duration_seconds", "must be at least 1")),
            (None, Some(d)) => start.saturating_add(seconds_us("duration_seconds", d)?),
            (None, None) => {
                return Err(Error::invalid("end", "a reservation needs an end: give `end` or `duration_seconds`"));
            }
        };
        if end <= now {
            return Err(Error::invalid("end", format!("{} is not in the future", format_micros(end))));
        }
        if end <= start {
            return Err(Error::invalid(
                "end",
                format!("{} is not after the start {}", format_micros(end), format_micros(start)),
            ));
        }
        Ok((start, end))
    }
}

impl State {
    /// Checks a reservation request at `now` and resolves its window; invalid input names the
    /// field and what is allowed (nothing is written).
    fn resolve_reservation(&self, req: &ReservationRequest, now: Micros) -> Result<Resolved> {
        let (tenant, job_id) = req.holder()?;
        let cfg = &self.config;
        let pool = pool_of(self);
        let resources = Resources {
            cpu_millicores: cfg.worker_cpu_millicores.saturating_mul(u64::from(req.workers)),
            memory_mib: cfg.worker_memory_mib.saturating_mul(u64::from(req.workers)),
            workers: req.workers,
        };
        if req.workers == 0 || !resources.fits_within(pool) {
            let most = (1..=pool.workers)
                .rev()
                .find(|&n| {
                    u64::from(n) * cfg.worker_cpu_millicores <= pool.cpu_millicores
                        && u64::from(n) * cfg.worker_memory_mib <= pool.memory_mib
                })
                .unwrap_or(0);
            return Err(Error::invalid(
                "workers",
                format!(
                    "{} is out of range; allowed values: 1 to {most} (what the pool could ever hold at once)",
                    req.workers
                ),
            ));
        }
        let (start_us, end_us) = req.window(now)?;
        let lead = cfg.max_reservation_lead_seconds;
        if start_us.saturating_since(now) > (lead as i64).saturating_mul(MICROS_PER_SECOND) {
            return Err(Error::invalid(
                "start",
                format!("{} is more than max_reservation_lead_seconds ({lead}) from now", format_micros(start_us)),
            ));
        }
        let longest = cfg.max_reservation_seconds;
        if end_us.saturating_since(start_us) > (longest as i64).saturating_mul(MICROS_PER_SECOND) {
            return Err(Error::invalid(
                if req.duration_seconds.is_some() { "duration_seconds" } else { "end" },
                format!("the window would last more than max_reservation_seconds ({longest}); allowed: 1 to {longest} seconds"),
            ));
        }
        Ok(Resolved { tenant, job_id, resources, start_us, end_us })
    }

    /// Decides a reservation at `now` as reservation `id`: invalid input is an error (nothing
    /// written); a window that cannot be honoured beside the allocations whose deadlines reach
    /// into it and the other reservations is a `reservation_rejected` event; otherwise
    /// `reserved`.
    pub fn decide_reservation(
        &self,
        req: &ReservationRequest,
        now: Micros,
        id: ReservationId,
    ) -> Result<std::result::Result<Reservation, ReservationRejection>> {
        let r = self.resolve_reservation(req, now)?;
        let reservation = Reservation {
            reservation_id: id,
            tenant: r.tenant,
            job_id: r.job_id,
            resources: r.resources,
            start_us: r.start_us,
            end_us: r.end_us,
        };
        let change =
            Change { hold: None, extra: Resources::default(), replaces: None, reservation: Some(&reservation) };
        let Some(b) = self.first_breach(reservation.start_us, reservation.end_us, &change) else {
            return Ok(Ok(reservation));
        };
        let error = format!(
            "cannot reserve {} workers for {} from {} to {}: at {} only {} of the {} needed {} are left beside allocations whose deadlines reach into the window and other reservations",
            reservation.resources.workers,
            reservation.holder_text(),
            format_micros(reservation.start_us),
            format_micros(reservation.end_us),
            format_micros(b.at),
            b.available,
            b.needed,
            b.resource,
        );
        Ok(Err(ReservationRejection {
            reservation_id: id,
            tenant: reservation.tenant,
            job_id: reservation.job_id,
            resources: reservation.resources,
            start_us: reservation.start_us,
            end_us: reservation.end_us,
            conflict_at_us: b.at,
            resource: b.resource.to_string(),
            needed: b.needed,
            available: b.available,
            error,
        }))
    }

    /// Decides a cancellation: the reservation, if it is in force or upcoming at `now`; an
    /// unknown id, or one cancelled or over, is invalid input naming `reservation_id`.
    pub fn decide_cancel_reservation(&self, id: ReservationId, now: Micros) -> Result<&Reservation> {
        self.reservations.get(id).filter(|r| r.end_us > now).ok_or_else(|| {
            Error::invalid(
                "reservation_id",
                format!("{id} is not a reservation in force or upcoming (unknown, cancelled, or its window is over); list_reservations shows those that are"),
            )
        })
    }

    /// Folds the reservation events (the rest of `evolve`): returns false for one that does
    /// not apply (an anomaly).
    pub(crate) fn fold_reservation(&mut self, body: &crate::domain::event::EventBody) -> bool {
        use crate::domain::event::EventBody;
        match body {
            EventBody::Reserved(r) => self.reservations.add(r.clone()),
            EventBody::ReservationCancelled { reservation_id } => self.reservations.cancel(*reservation_id),
            _ => true,
        }
    }

    /// Drops the reservations whose window closed by `ts_us` (an event's timestamp).
    pub(crate) fn forget_reservations_over(&mut self, ts_us: Micros) {
        self.reservations.forget_over(ts_us);
    }

    /// The reservation id the next event would decide.
    pub fn next_reservation_id(&self) -> ReservationId {
        ReservationId::for_seq(&self.ledger_id, self.last_seq + 1)
    }
}
