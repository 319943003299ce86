//! `request_resources_async` as one future: decided now, or, for a request with `wait` (or a
//! keyed retry of one that waits), resolved when the queue decides it.

use super::{Admission, GrantWait};
use crate::ledger::{Durable, Ledger};
use crate::report::RequestOutcome;
use crate::Result;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of [`Ledger::request_resources_async`]: resolves with the grant or the failed
/// report once durable. A request that waits in the queue (`wait: true`) resolves when it is
/// granted, timed out (`queue_timeout`) or cancelled, as [`Ledger::wait_for_grant`] does;
/// something must write the timeout when it is due (the MCP server's timer, any write).
#[must_use = "a request does nothing until it is awaited"]
pub struct RequestFuture {
    ledger: Ledger,
    stage: Stage,
}

enum Stage {
    /// Being decided (nothing is queued until the first poll).
    Admitting(Durable<Admission>),
    /// Waiting in the queue.
    Waiting(GrantWait),
}

impl RequestFuture {
    pub(in crate::ledger) fn new(ledger: &Ledger, admitting: Durable<Admission>) -> RequestFuture {
        RequestFuture { ledger: ledger.clone(), stage: Stage::Admitting(admitting) }
    }
}

impl std::fmt::Debug for RequestFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match &self.stage {
            Stage::Admitting(_) => "admitting",
            Stage::Waiting(_) => "waiting",
        };
        f.debug_struct("RequestFuture").field("stage", &stage).finish_non_exhaustive()
    }
}

impl Future for RequestFuture {
    type Output = Result<RequestOutcome>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<RequestOutcome>> {
        let this = self.get_mut();
        loop {
            match &mut this.stage {
                Stage::Admitting(d) => match Pin::new(d).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(Admission::Decided(o))) => return Poll::Ready(Ok(o)),
                    Poll::Ready(Ok(Admission::Pending(p))) => {
                        this.stage = Stage::Waiting(this.ledger.wait_for_grant(&p.allocation_id.to_string()));
                    }
                },
                Stage::Waiting(w) => return Pin::new(w).poll(cx),
            }
        }
    }
}
