//! The scheduler's contract on the command line: `request --idempotency-key`, `--dry-run`,
//! `--expected-seq` on every write, and `renew`.

use super::{human_outcome, parse_number, warn_snapshot_error, Out};
use allocation_ledger::{format_micros, Error, ExitCode, Ledger, Micros, PlanReport, RenewReport, ResourceRequest};
use clap::Args;

/// `--expected-seq`: the write's precondition.
#[derive(Debug, Args)]
pub(super) struct ExpectSeq {
    /// Apply only if the ledger's last sequence number is still this one (the current_seq a
    /// read or `request --dry-run` printed); otherwise exit 7 (conflict) and write nothing
    #[arg(long, value_name = "SEQ", allow_hyphen_values = true)]
    expected_seq: Option<String>,
}

impl ExpectSeq {
    /// The sequence number given, checked.
    pub(super) fn seq(&self) -> allocation_ledger::Result<Option<u64>> {
        self.expected_seq.as_deref().map(|t| parse_number("expected_seq", t, u64::MAX)).transpose()
    }
}

/// `request`'s flags for retries, lifetimes and plans.
#[derive(Debug, Args)]
pub(super) struct RequestContract {
    /// Retry key (1 to 128 printable bytes, e.g. a UUID): the same key with the same request
    /// returns the original outcome and writes nothing; with another request it is an error
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    pub(super) idempotency_key: Option<String>,
    /// Renewals never move the deadline past the grant's time plus this many seconds
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    max_lifetime_seconds: Option<String>,
    /// Only say what would happen now (grant with slots and endpoints, or why not) and the
    /// ledger's current_seq; nothing is written. Exit 0 if it would be granted, 3 if not
    #[arg(long)]
    pub(super) dry_run: bool,
    #[command(flatten)]
    pub(super) expect: ExpectSeq,
}

impl RequestContract {
    /// `--max-lifetime-seconds`, checked.
    pub(super) fn max_lifetime_seconds(&self) -> allocation_ledger::Result<Option<u64>> {
        self.max_lifetime_seconds.as_deref().map(|t| parse_number("max_lifetime_seconds", t, u64::MAX)).transpose()
    }
}

/// `renew`'s arguments.
#[derive(Debug, Args)]
pub(super) struct RenewArgs {
    /// alloc-xxxxxxxxxxxx
    pub(super) allocation_id: String,
    /// The new lifetime, counted from now [default: the allocation's own ttl]
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub(super) ttl_seconds: Option<String>,
    #[command(flatten)]
    pub(super) expect: ExpectSeq,
}

/// `renew ID [--ttl-seconds S] [--expected-seq N]`.
pub(super) fn renew(out: &Out, ledger: &Ledger, args: &RenewArgs) -> allocation_ledger::Result<ExitCode> {
    let ttl_seconds = args.ttl_seconds.as_deref().map(|t| parse_number("ttl_seconds", t, u64::MAX)).transpose()?;
    let r = match args.expect.seq()? {
        Some(seq) => ledger.if_seq(seq).renew_allocation(&args.allocation_id, ttl_seconds)?,
        None => ledger.renew_allocation(&args.allocation_id, ttl_seconds)?,
    };
    warn_snapshot_error(ledger);
    out.doc(&r, || human_renew(&r))?;
    Ok(ExitCode::Ok)
}

pub(super) fn human_renew(r: &RenewReport) -> String {
    let at = |t: &chrono::DateTime<chrono::Utc>| format_micros(Micros::from_micros(t.timestamp_micros()));
    let capped = if r.capped_by_max_lifetime { " (cut short by its max_lifetime_seconds)" } else { "" };
    format!(
        "renewed {} (job {}): expires {} instead of {}{capped}; renewal {} (event {})",
        r.allocation_id,
        r.job_id,
        at(&r.expires_at),
        at(&r.previous_expires_at),
        r.renewals,
        r.seq
    )
}

/// `request --dry-run`: the plan, nothing written.
pub(super) fn plan(out: &Out, ledger: &Ledger, req: &ResourceRequest) -> allocation_ledger::Result<ExitCode> {
    let p = ledger.plan_request(req)?;
    out.doc(&p, || human_plan(&p))?;
    Ok(if p.would_grant { ExitCode::Ok } else { ExitCode::NotGranted })
}

pub(super) fn human_plan(p: &PlanReport) -> String {
    let verdict = if p.would_grant { "would be granted" } else { "would not be granted" };
    format!(
        "dry run: {verdict} now (nothing written; the ledger is at seq {seq}: act with --expected-seq {seq})\n{}",
        human_outcome(&p.outcome),
        seq = p.current_seq
    )
}

/// The error's own fields in `--json` output: the current seq of a conflict, the state of an
/// allocation that is not active.
pub(super) fn error_fields(e: &Error, obj: &mut serde_json::Value) {
    match e {
        Error::Conflict { expected_seq, current_seq } => {
            obj["expected_seq"] = (*expected_seq).into();
            obj["current_seq"] = (*current_seq).into();
        }
        Error::NotActive { allocation_id, state } => {
            obj["allocation_id"] = allocation_id.clone().into();
            obj["state"] = state.clone().into();
        }
        _ => {}
    }
}
