//! Priority preemption on the write path (decided in `domain/preempt.rs`, `docs/policy.md`
//! §2): the grace sweep runs where the queue settles, in the same command as the event that
//! ends a grace (the expiry sweep's clock, a release, an expiry), so the victims' `preempted`
//! events and the preemptor's grant share a commit.

use super::{Core, Ledger};
use crate::domain::event::EventBody;
use crate::domain::model::Priority;
use crate::Result;

impl Ledger {
    /// Writes what preemptions in grace have come to: the `preempted` events of the victims
    /// whose grace is over, then the grant of each preemptor none of whose victims holds
    /// anything any more (each decision sees the events before it).
    pub(super) fn settle_preemptions(&self, core: &mut Core) -> Result<()> {
        if core.state.preemptions().next().is_none() {
            return Ok(());
        }
        let now = self.next_ts(&core.state);
        for body in core.state.decide_preemptions_due(now) {
            let ts = self.next_ts(&core.state);
            self.append(core, ts, body)?;
        }
        loop {
            let ts = self.next_ts(&core.state);
            let Some(grant) = core.state.decide_preemptor_grant(ts) else { break };
            self.append(core, ts, EventBody::Granted(grant))?;
        }
        Ok(())
    }

    /// Whether a request of `priority` may preempt with a grace period: it may then wait, so
    /// a caller that did not ask to wait still waits for its grant (as with `wait`).
    pub fn preempts_with_grace(&self, priority: Priority) -> bool {
        self.with_state(|s| s.may_preempt(priority) && s.config.preemption_grace_seconds > 0)
    }
}
