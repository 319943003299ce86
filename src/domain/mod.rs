//! The domain room: the pure core. The model, the event schema, the configuration, the state
//! fold (`evolve`) and every decision (`decide`). No I/O and no report formatting here.

/// Time: the clock the ledger reads, and the text timestamps take.
pub mod clock;
/// The configuration and the limits on input.
pub mod config;
/// Every decision: command + state -> event.
pub mod decide;
/// The event schema.
pub mod event;
/// Idempotency keys: the table of recent keys and the request fingerprint.
pub mod idempotency;
/// Request input: parsing and validation shared by CLI, MCP and library.
pub mod input;
/// Ids, priorities, states, resource amounts, metadata.
pub mod model;
/// Pool changes (add, drain, remove workers; the MCP catalog) and their words.
pub mod pool;
/// Priority preemption: which allocations a request would preempt (the decision only).
pub mod preempt;
/// The fair pending queue: waiting requests, aging, backfill.
pub mod queue;
/// Per-tenant quotas.
pub mod quota;
/// Advance reservations: capacity held for a future window.
pub mod reservation;
/// The fold (`evolve`) and its queries.
pub mod state;
