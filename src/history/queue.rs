//! The queue in an allocation's history, in words: where a request joined the queue and behind
//! whom, how long it waited and what freed the capacity that ended the wait, or that it timed
//! out or was cancelled. A grant from the queue names its `queued` event (`queued_seq`), which
//! is read from the log when the history's scan started after it.

use super::HistoryEvent;
use crate::domain::clock::{format_micros, Micros, MICROS_PER_SECOND};
use crate::domain::event::{EventBody, RejectReason};
use crate::domain::model::AllocationId;
use crate::ledger::Ledger;
use crate::Result;

/// Events before a grant from the queue searched for the one that freed its capacity.
const CAUSE_LOOKBACK: u64 = 64;

impl Ledger {
    /// Adds the `queued` events the scan missed and explains every wait.
    pub(super) fn explain_waits(&self, events: &mut Vec<HistoryEvent>) -> Result<()> {
        let missing: Vec<u64> = events
            .iter()
            .filter_map(|e| match &e.event.body {
                EventBody::Granted(g) => g.queued_seq,
                _ => None,
            })
            .filter(|q| !events.iter().any(|e| e.seq == *q))
            .collect();
        for seq in missing {
            if let Some(e) = self.events(seq, 1)?.into_iter().next().filter(|e| e.seq == seq) {
                events.push(HistoryEvent { seq, at: format_micros(e.event.ts_us), event: e.event, explanation: None });
            }
        }
        self.add_orphan_queued(events)?;
        events.sort_by_key(|e| e.seq);
        for i in 0..events.len() {
            let explanation = self.explain(events, i)?;
            events[i].explanation = explanation;
        }
        Ok(())
    }

    /// The `queued` events of waits that ended (timed out, cancelled) after the history's scan
    /// began: searched for in the log up to `queue.max_timeout_seconds` before the end.
    fn add_orphan_queued(&self, events: &mut Vec<HistoryEvent>) -> Result<()> {
        let ended: Vec<(AllocationId, Micros, u64)> = events
            .iter()
            .filter_map(|e| match &e.event.body {
                EventBody::Rejected(r) if r.reason == RejectReason::QueueTimeout => {
                    Some((r.allocation_id, e.event.ts_us, e.seq))
                }
                EventBody::Cancelled { allocation_id } => Some((*allocation_id, e.event.ts_us, e.seq)),
                _ => None,
            })
            .filter(|(id, _, _)| {
                !events.iter().any(|x| matches!(&x.event.body, EventBody::Queued(q) if q.allocation_id == *id))
            })
            .collect();
        for (id, ts, seq) in ended {
            let window_us = self.with_state(|s| s.config.queue.max_timeout_seconds) as i64 * MICROS_PER_SECOND;
            let after = self.seq_hint(ts - window_us)?;
            let (found, _) = self.history_scan(&super::Subject::Allocation(id), after, seq, None)?;
            events.extend(found.into_iter().filter(|e| matches!(e.event.body, EventBody::Queued(_))));
        }
        Ok(())
    }

    fn explain(&self, events: &[HistoryEvent], i: usize) -> Result<Option<String>> {
        let e = &events[i];
        let queued_at = |id| {
            events[..i].iter().rev().find_map(|x| match &x.event.body {
                EventBody::Queued(q) if q.allocation_id == id => Some(x.event.ts_us),
                EventBody::Preempting(p) if p.preemptor == id => Some(x.event.ts_us),
                _ => None,
            })
        };
        Ok(match &e.event.body {
            EventBody::Queued(q) => Some(format!(
                "queued at position {} behind {} higher-priority request(s): {}; waits until {} at most",
                q.position,
                q.behind_higher,
                q.waiting_reason,
                format_micros(q.timeout_us)
            )),
            EventBody::Granted(g) if g.queued_seq.is_some() => {
                let waited = queued_at(g.allocation_id).map(|t| seconds(e.event.ts_us - t));
                let cause = self.freed_by(e.seq)?;
                Some(match waited {
                    Some(w) => format!("granted after {w} s in the queue{cause}"),
                    None => format!("granted from the queue{cause}"),
                })
            }
            EventBody::Rejected(r) if r.reason == RejectReason::QueueTimeout => {
                let waited = queued_at(r.allocation_id)
                    .map_or_else(String::new, |t| format!("waited {} s, ", seconds(e.event.ts_us - t)));
                Some(format!("rejected: {waited}queue_timeout"))
            }
            EventBody::Preempting(p) => Some(preempting_words(p)),
            EventBody::Preempted(p) => Some(format!(
                "preempted by {} ({}) to make room; grace {} s",
                p.preemptor_job_id, p.preemptor_priority, p.grace_seconds
            )),
            EventBody::Cancelled { allocation_id } => {
                let waited = queued_at(*allocation_id)
                    .map_or_else(String::new, |t| format!(" after {} s in the queue", seconds(e.event.ts_us - t)));
                Some(format!("cancelled by its caller{waited}"))
            }
            _ => None,
        })
    }

    /// " when alloc-x released" (or expired, or the pool changed...): the event the grant at
    /// `seq` was decided after, in the same command.
    fn freed_by(&self, seq: u64) -> Result<String> {
        let from = seq.saturating_sub(CAUSE_LOOKBACK).max(1);
        let before = self.events(from, (seq - from) as usize)?;
        Ok(before
            .iter()
            .rev()
            .find_map(|e| match &e.event.body {
                EventBody::Released { allocation_id } => Some(format!(" when {allocation_id} released")),
                EventBody::Expired { allocation_id, .. } => Some(format!(" when {allocation_id} expired")),
                EventBody::Cancelled { allocation_id } => Some(format!(" when {allocation_id} was cancelled")),
                EventBody::Rejected(r) if r.reason == RejectReason::QueueTimeout => {
                    Some(format!(" when {} left the queue (queue_timeout)", r.allocation_id))
                }
                EventBody::ConfigChanged { .. } => Some(" when the pool changed".to_string()),
                EventBody::ReservationCancelled { reservation_id } => {
                    Some(format!(" when reservation {reservation_id} was cancelled"))
                }
                EventBody::Preempted(p) => Some(format!(" when {} was preempted", p.allocation_id)),
                EventBody::Renewed(_)
                | EventBody::Preempting(_)
                | EventBody::Queued(_)
                | EventBody::Granted(_)
                | EventBody::Rejected(_)
                | EventBody::Reserved(_)
                | EventBody::ReservationRejected(_) => None,
                EventBody::LedgerCreated { .. } => Some(String::new()),
            })
            .unwrap_or_default())
    }
}

/// A `preempting` event in words: who preempts whom, and until when.
fn preempting_words(p: &crate::domain::preempt::Preempting) -> String {
    let victims: Vec<String> = p.victims.iter().map(ToString::to_string).collect();
    format!(
        "{} ({}) preempts {} to make room; they keep their resources until {} (grace {} s), then it is granted",
        p.job_id,
        p.priority,
        victims.join(", "),
        format_micros(p.deadline_us),
        p.grace_seconds
    )
}

/// Whole seconds, rounded.
fn seconds(micros: i64) -> i64 {
    (micros.max(0) + MICROS_PER_SECOND / 2) / MICROS_PER_SECOND
}
