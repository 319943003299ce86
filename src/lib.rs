//! allocation-ledger: an event-sourced, durable ledger that hands worker slots and MCP servers
//! to AI-agent jobs.
//!
//! Every request, grant, rejection, release and expiry is a checksummed event appended to a
//! write-ahead log; the state is a fold over that log. See `docs/design.md` for the rooms and
//! `docs/format.md` for the bytes on disk.
//!
//! ```no_run
//! use allocation_ledger::{Ledger, ResourceRequest, RequestOutcome};
//! let ledger = Ledger::open("/tmp/ledger").unwrap();
//! match ledger.request_resources(&ResourceRequest::new("job-1").workers(2).mcp_server("github")).unwrap() {
//!     RequestOutcome::Granted(g) => println!("got {} workers as {}", g.workers_allocated.len(), g.allocation_id),
//!     RequestOutcome::Failed(f) => println!("not granted: {}", f.error),
//! }
//! ```

pub mod clock;
pub mod config;
pub mod error;
pub mod event;
pub mod history;
pub mod ledger;
#[cfg(feature = "server")]
pub mod mcp;
pub mod model;
pub mod record;
pub mod repair;
pub mod report;
pub mod segment;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod verify;
pub mod wal;

pub use clock::{Clock, ManualClock, Micros, SystemClock};
pub use config::Config;
pub use error::{Damage, Error, Result};
pub use event::{Event, EventBody, LoggedEvent};
pub use history::{EventRange, GroupBy, History, HistoryEvent, Timeline, UsageReport};
pub use ledger::{Durable, Ledger, OpenOptions, RecoveryReport};
pub use model::{AllocationId, AllocationState, Priority, Resources};
pub use report::*;
pub use state::{ResourceRequest, State};
