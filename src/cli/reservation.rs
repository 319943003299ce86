//! `reserve ...`, `reservations` and `reservation cancel ID`: advance reservations (see
//! docs/policy.md, "Advance reservations"), locally or through a running server.

use super::{parse_number, table, warn_snapshot_error, Out};
use allocation_ledger::{
    CancelReservationReport, ExitCode, Ledger, ReservationInfo, ReservationList, ReservationRequest, ReserveReport,
};
use clap::{Args, Subcommand};

/// `reserve`'s flags.
#[derive(Debug, Args)]
pub(super) struct ReserveArgs {
    /// The tenant to hold capacity for (every request of the tenant may use it)
    #[arg(long, conflicts_with = "job_id")]
    pub tenant: Option<String>,
    /// The job to hold capacity for (only its requests may use it)
    #[arg(long)]
    pub job_id: Option<String>,
    /// Worker slots to hold (their CPU and memory by the pool's worker shape are held too)
    #[arg(long)]
    pub workers: String,
    /// When the window opens: RFC 3339 (2026-12-05T09:00:00Z), now, or relative (+2h); default now
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, conflicts_with = "start_in_seconds")]
    pub start: Option<String>,
    /// When the window closes: RFC 3339 or relative (+4h)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, conflicts_with = "duration_seconds")]
    pub end: Option<String>,
    /// The window opens this many seconds from now (instead of --start)
    #[arg(long)]
    pub start_in_seconds: Option<String>,
    /// The window lasts this many seconds (instead of --end)
    #[arg(long)]
    pub duration_seconds: Option<String>,
}

impl ReserveArgs {
    /// The request the flags describe (numbers checked as the local and server modes check them).
    pub(super) fn request(&self) -> allocation_ledger::Result<ReservationRequest> {
        let seconds =
            |field: &str, v: &Option<String>| v.as_deref().map(|t| parse_number(field, t, u64::MAX)).transpose();
        Ok(ReservationRequest {
            tenant: self.tenant.clone(),
            job_id: self.job_id.clone(),
            workers: parse_number("workers", &self.workers, u64::from(u32::MAX))? as u32,
            start: self.start.clone(),
            end: self.end.clone(),
            start_in_seconds: seconds("start_in_seconds", &self.start_in_seconds)?,
            duration_seconds: seconds("duration_seconds", &self.duration_seconds)?,
        })
    }
}

/// `reservation ...`.
#[derive(Debug, Subcommand)]
pub(super) enum ReservationCommand {
    /// Cancel a reservation in force or upcoming: what it held is everyone's again at once
    Cancel {
        /// resv-xxxxxxxxxxxx
        reservation_id: String,
    },
}

/// `reserve`, `reservations` or `reservation cancel` on the ledger in `dir`.
pub(super) fn run(
    out: &Out,
    dir: &std::path::PathBuf,
    config: &Option<std::path::PathBuf>,
    cmd: &super::Command,
) -> allocation_ledger::Result<ExitCode> {
    match cmd {
        super::Command::Reserve(args) => reserve(out, &super::open_writer(dir, config)?, args),
        super::Command::Reservation(ReservationCommand::Cancel { reservation_id }) => {
            cancel(out, &super::open_writer(dir, config)?, reservation_id)
        }
        super::Command::Reservations { at } => list(out, &super::open_reader(dir, config)?, at.as_deref()),
        _ => Err(allocation_ledger::Error::invalid("command", "not a reservation command")),
    }
}

/// `reserve ...` against the ledger: exit 0 if reserved, 3 if it could not be honoured.
pub(super) fn reserve(out: &Out, ledger: &Ledger, args: &ReserveArgs) -> allocation_ledger::Result<ExitCode> {
    let report = ledger.reserve(&args.request()?)?;
    warn_snapshot_error(ledger);
    print_reserve(out, &report)
}

/// Prints a reservation's outcome; its exit code.
pub(super) fn print_reserve(out: &Out, r: &ReserveReport) -> allocation_ledger::Result<ExitCode> {
    out.doc(r, || human_reserve(r))?;
    Ok(if r.is_reserved() { ExitCode::Ok } else { ExitCode::NotGranted })
}

/// `reservation cancel ID` against the ledger.
pub(super) fn cancel(out: &Out, ledger: &Ledger, id: &str) -> allocation_ledger::Result<ExitCode> {
    let report = ledger.cancel_reservation(id)?;
    warn_snapshot_error(ledger);
    print_cancel(out, &report)
}

/// Prints a cancellation.
pub(super) fn print_cancel(out: &Out, r: &CancelReservationReport) -> allocation_ledger::Result<ExitCode> {
    out.doc(r, || {
        format!(
            "cancelled {} ({} workers for {}, {} to {}; event {})",
            r.reservation.reservation_id,
            r.reservation.workers,
            r.reservation.holder_text(),
            r.reservation.start,
            r.reservation.end,
            r.seq
        )
    })?;
    Ok(ExitCode::Ok)
}

/// `reservations [--at TIME]` against the ledger.
pub(super) fn list(out: &Out, ledger: &Ledger, at: Option<&str>) -> allocation_ledger::Result<ExitCode> {
    let l = match at {
        None => ledger.reservations()?,
        Some(at) => ledger.reservations_at(allocation_ledger::parse_time("at", at, ledger.now_micros())?)?,
    };
    print_list(out, &l)
}

/// `reservations`: the list, in force and upcoming.
pub(super) fn print_list(out: &Out, l: &ReservationList) -> allocation_ledger::Result<ExitCode> {
    out.tabular(l, || human_list(l), || list_rows(&l.reservations), || list_rows(&l.reservations))?;
    Ok(ExitCode::Ok)
}

fn human_reserve(r: &ReserveReport) -> String {
    let v = &r.reservation;
    if r.is_reserved() {
        format!(
            "reserved {} for {}: {} workers ({:.1} CPU, {} MiB) from {} to {} ({}; event {})",
            v.reservation_id,
            v.holder_text(),
            v.workers,
            v.cpu_millicores as f64 / 1000.0,
            v.memory_mib,
            v.start,
            v.end,
            v.state.replace('_', " "),
            r.seq
        )
    } else {
        format!("not reserved ({}): {}", v.reservation_id, r.error.as_deref().unwrap_or("conflict"))
    }
}

const LIST_HEADER: [&str; 7] = ["RESERVATION", "HOLDER", "WORKERS", "START", "END", "STATE", "MEMORY_MIB"];

fn list_rows(rows: &[ReservationInfo]) -> super::output::Rows {
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.reservation_id.clone(),
                r.holder_text(),
                r.workers.to_string(),
                r.start.clone(),
                r.end.clone(),
                r.state.clone(),
                r.memory_mib.to_string(),
            ]
        })
        .collect();
    super::output::Rows { header: LIST_HEADER.to_vec(), rows }
}

fn human_list(l: &ReservationList) -> String {
    if l.reservations.is_empty() {
        return format!("no reservations in force or upcoming (as of {}, sequence number {})", l.as_of, l.seq);
    }
    let rows = list_rows(&l.reservations);
    let mut s = table(&rows.header, &rows.rows);
    s.push_str(&format!("as of {} (sequence number {})\n", l.as_of, l.seq));
    s
}
