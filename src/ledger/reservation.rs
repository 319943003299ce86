//! Advance reservations through the write path: `reserve` and `cancel_reservation` are
//! decided under the core lock (`domain/reservation.rs`) and recorded as events; the listing
//! reads the state. Their reports are here.

use super::Ledger;
use crate::domain::clock::{format_micros, Micros, MICROS_PER_SECOND};
use crate::domain::event::EventBody;
use crate::domain::reservation::{Reservation, ReservationId, ReservationRequest};
use crate::domain::state::State;
use crate::Result;
use serde::{Deserialize, Serialize};

/// One reservation as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    /// Its id (`resv-…`).
    pub reservation_id: String,
    /// The tenant it holds capacity for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The job it holds capacity for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Workers reserved.
    pub workers: u32,
    /// CPU reserved (the workers' share by the pool's worker shape).
    pub cpu_millicores: u64,
    /// Memory reserved.
    pub memory_mib: u64,
    /// When the window opens (RFC 3339).
    pub start: String,
    /// When it closes.
    pub end: String,
    /// Its length.
    pub duration_seconds: u64,
    /// `in_force` or `upcoming` at the instant of the report (`over` once it has closed).
    pub state: String,
}

impl ReservationInfo {
    /// The view of `r` at `now`.
    pub fn of(r: &Reservation, now: Micros) -> Self {
        let state = if r.end_us <= now {
            "over"
        } else if r.start_us <= now {
            "in_force"
        } else {
            "upcoming"
        };
        ReservationInfo {
            reservation_id: r.reservation_id.to_string(),
            tenant: r.tenant.clone(),
            job_id: r.job_id.clone(),
            workers: r.resources.workers,
            cpu_millicores: r.resources.cpu_millicores,
            memory_mib: r.resources.memory_mib,
            start: format_micros(r.start_us),
            end: format_micros(r.end_us),
            duration_seconds: (r.end_us.saturating_since(r.start_us) / MICROS_PER_SECOND).max(0) as u64,
            state: state.to_string(),
        }
    }

    /// "tenant team-a" or "job train-7".
    pub fn holder_text(&self) -> String {
        match (&self.tenant, &self.job_id) {
            (Some(t), _) => format!("tenant {t}"),
            (None, Some(j)) => format!("job {j}"),
            (None, None) => String::new(),
        }
    }
}

/// What `reserve` decided: `reserved`, or `failed` with why (recorded either way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveReport {
    /// `reserved` or `failed`.
    pub status: String,
    /// The reservation (what was asked for, if it failed).
    #[serde(flatten)]
    pub reservation: ReservationInfo,
    /// `reservation_conflict` when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The first instant it would not have fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_at: Option<String>,
    /// The event that recorded the decision.
    pub seq: u64,
}

impl ReserveReport {
    /// Whether the reservation was made.
    pub fn is_reserved(&self) -> bool {
        self.status == "reserved"
    }
}

/// What `cancel_reservation` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReservationReport {
    /// `cancelled`.
    pub status: String,
    /// The reservation as it was.
    #[serde(flatten)]
    pub reservation: ReservationInfo,
    /// The `reservation_cancelled` event.
    pub seq: u64,
}

/// `list_reservations`: the reservations in force or upcoming now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationList {
    /// By start, then id.
    pub reservations: Vec<ReservationInfo>,
    /// The instant of the listing.
    pub as_of: String,
    /// The ledger's last sequence number.
    pub seq: u64,
}

impl ReservationList {
    /// The reservations `state` keeps in force or upcoming at `now`.
    pub fn of(state: &State, now: Micros) -> Self {
        ReservationList {
            reservations: state.reservations_at(now).into_iter().map(|r| ReservationInfo::of(r, now)).collect(),
            as_of: format_micros(now),
            seq: state.last_seq,
        }
    }
}

/// A reservation decided against `state` at `ts`: the event and its report.
fn decide_reserve(state: &State, ts: Micros, req: &ReservationRequest) -> Result<(Vec<EventBody>, ReserveReport)> {
    let seq = state.last_seq + 1;
    Ok(match state.decide_reservation(req, ts, state.next_reservation_id())? {
        Ok(r) => {
            let report = ReserveReport {
                status: "reserved".into(),
                reservation: ReservationInfo::of(&r, ts),
                reason: None,
                error: None,
                conflict_at: None,
                seq,
            };
            (vec![EventBody::Reserved(r)], report)
        }
        Err(rej) => {
            let as_asked = Reservation {
                reservation_id: rej.reservation_id,
                tenant: rej.tenant.clone(),
                job_id: rej.job_id.clone(),
                resources: rej.resources,
                start_us: rej.start_us,
                end_us: rej.end_us,
            };
            let report = ReserveReport {
                status: "failed".into(),
                reservation: ReservationInfo::of(&as_asked, ts),
                reason: Some("reservation_conflict".into()),
                error: Some(rej.error.clone()),
                conflict_at: Some(format_micros(rej.conflict_at_us)),
                seq,
            };
            (vec![EventBody::ReservationRejected(rej)], report)
        }
    })
}

impl Ledger {
    /// `reserve_resources`: holds `req.workers` workers (and their CPU and memory) for a
    /// tenant or a job over a window. Recorded as `reserved`, or, if the window cannot be
    /// honoured beside the allocations whose deadlines reach into it and the other
    /// reservations, as `reservation_rejected` (status `failed`). Invalid input is an error
    /// and writes nothing. See `docs/policy.md`, "Advance reservations".
    ///
    /// ```
    /// use allocation_ledger::storage::MemoryStorage;
    /// use allocation_ledger::{Ledger, OpenOptions, ReservationRequest, ResourceRequest};
    /// use std::sync::Arc;
    /// let ledger = Ledger::open_with("/l", OpenOptions::default().storage(Arc::new(MemoryStorage::new())))?;
    /// // Six of the ten workers for team-a, from an hour from now, for two hours.
    /// let r = ledger.reserve(&ReservationRequest::for_tenant("team-a", 6).window_seconds(3600, 7200))?;
    /// assert!(r.is_reserved());
    /// // A lease of two hours now would reach into the window: only four workers fit beside it.
    /// let big = ResourceRequest::new("other").workers(5).ttl_seconds(7200);
    /// assert!(!ledger.request_resources(&big)?.is_granted());
    /// // One that ends before the window opens may take them all.
    /// assert!(ledger.request_resources(&ResourceRequest::new("short").workers(10).ttl_seconds(600))?.is_granted());
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn reserve(&self, req: &ReservationRequest) -> Result<ReserveReport> {
        let req = req.clone();
        self.write_checked(|_, _| Ok(None), move |state, ts, _| decide_reserve(state, ts, &req))
    }

    /// `cancel_reservation`: ends a reservation in force or upcoming now (a
    /// `reservation_cancelled` event); what it held is free again at once. An id that is not
    /// in force or upcoming (unknown, cancelled, over) is invalid input naming
    /// `reservation_id`.
    pub fn cancel_reservation(&self, reservation_id: &str) -> Result<CancelReservationReport> {
        let id = ReservationId::parse("reservation_id", reservation_id)?;
        self.write_checked(
            |_, _| Ok(None),
            move |state, ts, _| {
                let r = state.decide_cancel_reservation(id, ts)?;
                let report = CancelReservationReport {
                    status: "cancelled".into(),
                    reservation: ReservationInfo::of(r, ts),
                    seq: state.last_seq + 1,
                };
                Ok((vec![EventBody::ReservationCancelled { reservation_id: id }], report))
            },
        )
    }

    /// `list_reservations`: the reservations in force or upcoming now, by start.
    pub fn reservations(&self) -> Result<ReservationList> {
        self.read(ReservationList::of)
    }
}
