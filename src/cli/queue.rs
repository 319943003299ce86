//! The pending queue on the command line: `request --wait [--timeout SECONDS]` (blocks until
//! granted, cancelled or timed out; says where it waits on stderr meanwhile) and `cancel ID`.

use super::{human_outcome, parse_number, warn_snapshot_error, Out};
use allocation_ledger::{Admission, CancelReport, ExitCode, Ledger, PendingReport, ResourceRequest};
use clap::Args;

/// `request`'s flags for waiting in the queue.
#[derive(Debug, Args)]
pub(super) struct WaitArgs {
    /// If the pool cannot hold the request now, wait in the fair queue (priority, then FIFO,
    /// with aging) until it is granted, cancelled (`cancel ID`) or --timeout passes (exit 3,
    /// reason queue_timeout). A request that could never fit is refused at once
    #[arg(long)]
    pub(super) wait: bool,
    /// With --wait: the longest wait, in seconds [default: the config's
    /// queue.default_timeout_seconds, 300]
    #[arg(long, value_name = "SECONDS", requires = "wait", allow_hyphen_values = true)]
    pub(super) timeout: Option<String>,
    /// Ask not to be preempted by higher priorities (allowed only for the config's
    /// non_preemptible_priorities: by default critical)
    #[arg(long, conflicts_with = "preemptible")]
    pub(super) not_preemptible: bool,
    /// true or false: whether a higher priority may preempt the allocation [default: true]
    #[arg(long, value_name = "BOOL")]
    pub(super) preemptible: Option<bool>,
}

impl WaitArgs {
    /// The request's queue fields (the rest left to fill in).
    pub(super) fn fields(&self) -> allocation_ledger::Result<ResourceRequest> {
        let queue_timeout_seconds =
            self.timeout.as_deref().map(|t| parse_number("queue_timeout_seconds", t, u64::MAX)).transpose()?;
        // Preemption's flag rides here too: a preempting request may wait like a queued one.
        let preemptible = if self.not_preemptible { Some(false) } else { self.preemptible };
        Ok(ResourceRequest { wait: self.wait, queue_timeout_seconds, preemptible, ..ResourceRequest::default() })
    }
}

/// `request` on a local ledger: `--wait` (without `--dry-run` or `--expected-seq`) waits here;
/// anything else is the usual request or plan.
pub(super) fn request_or_plan(
    out: &Out,
    open: impl Fn() -> allocation_ledger::Result<Ledger>,
    req: &ResourceRequest,
    contract: &super::contract::RequestContract,
) -> allocation_ledger::Result<ExitCode> {
    let direct = contract.dry_run || contract.expect.seq()?.is_some();
    if req.wait && !direct {
        return request(out, open, req);
    }
    let ledger = open()?;
    // A preemption with a grace period waits for its victims: here, not holding the ledger.
    if !direct && ledger.preempts_with_grace(req.priority) {
        drop(ledger);
        return request(out, open, req);
    }
    super::request_or_plan(out, &ledger, req, contract)
}

/// How often a local `request --wait` looks again.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// `request --wait` on a local ledger: queued (said on stderr), then blocks until decided. The
/// ledger is not kept open while it waits (its lock would keep every other writer out, the
/// releases it waits for included): it is opened again every 200 ms to look, and to write the
/// queue's timeouts when due. (Through a running server the call itself waits, no polling.)
fn request(
    out: &Out,
    open: impl Fn() -> allocation_ledger::Result<Ledger>,
    req: &ResourceRequest,
) -> allocation_ledger::Result<ExitCode> {
    let ledger = open()?;
    let admitted = ledger.request_or_queue(req)?;
    warn_snapshot_error(&ledger);
    drop(ledger);
    let outcome = match admitted {
        Admission::Decided(o) => o,
        Admission::Pending(p) => {
            eprintln!("{}", human_pending(&p));
            let id = p.allocation_id.to_string();
            loop {
                std::thread::sleep(LOOK_EVERY);
                match open() {
                    Ok(l) => {
                        if let Some(o) = l.queued_outcome(&id)? {
                            break o;
                        }
                    }
                    Err(allocation_ledger::Error::Locked { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    };
    out.doc(&outcome, || human_outcome(&outcome))?;
    Ok(if outcome.is_granted() { ExitCode::Ok } else { ExitCode::NotGranted })
}

/// "queued alloc-… at position 3: behind ..."
pub(super) fn human_pending(p: &PendingReport) -> String {
    format!(
        "{} (job {}) is pending at position {} of the queue: {}; waiting until {} at most",
        p.allocation_id,
        p.job_id,
        p.queue_position,
        p.waiting_reason,
        allocation_ledger::format_micros(allocation_ledger::Micros::from_micros(p.timeout_at.timestamp_micros()))
    )
}

/// `cancel ID` on a local ledger.
pub(super) fn cancel(out: &Out, ledger: &Ledger, allocation_id: &str) -> allocation_ledger::Result<ExitCode> {
    let r = ledger.cancel_request(allocation_id)?;
    warn_snapshot_error(ledger);
    out.doc(&r, || human_cancel(&r))?;
    Ok(ExitCode::Ok)
}

/// The words of a cancel.
pub(super) fn human_cancel(r: &CancelReport) -> String {
    format!("cancelled {} (job {}) after {:.1} s in the queue", r.allocation_id, r.job_id, r.waited_seconds)
}
