//! What-if: the recorded demand re-decided under another pool or policy, in memory, writing
//! nothing (`docs/queries.md`, "What-if").
//!
//! - `demand`: each recorded request rebuilt from the event that recorded its outcome, and the
//!   log read as a stream;
//! - `simulate`: the virtual-clock run through the ledger's own decision code
//!   (`State::decide_grant`) and fold (`State::evolve`);
//! - `compare`: reality and the what-if side by side;
//! - `svg`: both utilisation timelines on one chart.
//!
//! With the recorded config the run decides exactly what the ledger decided, which makes it a
//! check of determinism as well as a planning tool.

mod compare;
mod demand;
mod simulate;
mod svg;

pub use compare::{BucketPair, Comparison, GroupRow, OutcomeChanges, ResourceUse, SideReport, WaitStats};
pub use simulate::SimObserver;

use crate::domain::clock::{parse_duration_micros, Micros, MICROS_PER_SECOND};
use crate::domain::config::Config;
use crate::ledger::Ledger;
use crate::{Error, Result};
use serde::Serialize;

/// How long a request that reality rejected and the what-if grants is held (reality has no
/// holding time for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    /// Until its deadline: the whole lifetime it asked for (the default).
    #[default]
    Ttl,
    /// The median of its job's recorded holding times (the last 64 that ended before it
    /// arrived); its lifetime when the job has none.
    MedianOfJob,
    /// A fixed time, in µs (never past its deadline).
    Fixed(i64),
}

impl Hold {
    /// Parses `ttl`, `median-of-job` or a duration (`15m`, `2h`); the error names `field`.
    pub fn parse(field: &str, text: &str) -> Result<Hold> {
        match text {
            "ttl" => Ok(Hold::Ttl),
            "median-of-job" => Ok(Hold::MedianOfJob),
            other => match parse_duration_micros(other) {
                Some(us) if us > 0 => Ok(Hold::Fixed(us)),
                _ => Err(Error::invalid(
                    field,
                    format!("{other:?} is not a hold: use ttl, median-of-job or a duration such as 15m"),
                )),
            },
        }
    }
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::Ttl => f.write_str("ttl"),
            Hold::MedianOfJob => f.write_str("median-of-job"),
            Hold::Fixed(us) => write!(f, "{}s", us / MICROS_PER_SECOND),
        }
    }
}

/// What to re-decide, and under what.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WhatIfOptions {
    /// Fields of the config to change (a JSON object of `Config` fields) over the one recorded
    /// at the window's start; `None`: the recorded config, and its recorded changes.
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Start of the window (inclusive); the ledger's start when `None`.
    pub since: Option<Micros>,
    /// End of the window (exclusive); now when `None`.
    pub until: Option<Micros>,
    /// How long what-if-only grants are held.
    pub hold: Hold,
}

/// Reality against the what-if over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WhatIfReport {
    /// The hold assumed for what-if-only grants.
    pub hold: String,
    /// The what-if ran with the recorded config (a determinism check).
    pub recorded_config: bool,
    /// The what-if's config at the window's start.
    pub config: Option<Config>,
    /// With the recorded config: whether every decision came out as recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reproduced: Option<bool>,
    /// With the recorded config: decisions that differ from the recorded ones.
    pub differing_decisions: u64,
    /// The sequence number of the first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_difference_seq: Option<u64>,
    /// Recorded config changes in the window the what-if did not apply (an alternative config
    /// stays in force for the whole window).
    pub config_changes_ignored: u64,
    /// The two runs side by side.
    #[serde(flatten)]
    pub comparison: Comparison,
}

impl WhatIfReport {
    /// Both utilisation timelines as one standalone SVG chart.
    pub fn to_svg(&self) -> String {
        svg::render(self)
    }
}

impl Ledger {
    /// Re-decides the recorded demand of a window under `opts.config` (see [`WhatIfOptions`])
    /// and reports it beside reality. Reads the log once, from its start; writes nothing.
    pub fn what_if(&self, opts: &WhatIfOptions) -> Result<WhatIfReport> {
        self.what_if_observed(opts, &mut ())
    }

    /// [`Ledger::what_if`], showing `observer` every recorded event read and every event the
    /// what-if folded.
    pub fn what_if_observed(&self, opts: &WhatIfOptions, observer: &mut dyn SimObserver) -> Result<WhatIfReport> {
        let (start, now) = self.with_state(|s| (s.created_us, s.last_ts_us));
        let now = self.now_micros().max(now + 1);
        let since = opts.since.unwrap_or(start).max(start);
        let until = opts.until.unwrap_or(now).min(now);
        if until <= since {
            return Err(Error::invalid(
                "until",
                format!(
                    "the window [{}, {}) holds no part of the ledger's life (it begins {})",
                    crate::format_micros(since),
                    crate::format_micros(until),
                    crate::format_micros(start)
                ),
            ));
        }
        let mut sim = simulate::Simulator::new(opts.config.clone(), opts.hold, since, until, observer);
        demand::stream_log(self, &mut |seq, ev| sim.observe(seq, ev))?;
        sim.finish()
    }
}
