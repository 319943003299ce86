//! `log --follow`: the events as NDJSON (or CSV) as they are appended, from a
//! [`LogFollower`] that reads the segment files read-only, so it runs beside a writer (`serve`,
//! or `request` calls) in another process. It keeps going until interrupted, `--limit` events
//! were printed, or stdout is closed (`| head`: exit 0 at the next event written).

use super::output::{EventSink, Format};
use super::Out;
use allocation_ledger::{Error, ExitCode, LogFollower};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How long the follower waits after a poll that found nothing new: the most an event waits
/// before it is printed. A poll of unchanged files costs a directory listing and a `stat`.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// At most this many events are read per poll (then printed before the next is read).
const BATCH: usize = 4096;

/// Prints the events from `from_seq` on as they become readable; never returns unless stdout
/// closes, `limit` events were printed, or the log cannot be read (damage that stays, or the
/// log no longer holds `from_seq`).
pub(super) fn follow(
    out: &Out,
    dir: &Path,
    from_seq: u64,
    limit: Option<usize>,
) -> allocation_ledger::Result<ExitCode> {
    if !out.json && out.format == Some(Format::Table) {
        return Err(Error::InvalidInput {
            field: "output".into(),
            message: "log --follow prints NDJSON (the default, -o json) or CSV: a table is printed only once all its rows are known".into(),
        });
    }
    let mut follower = LogFollower::new(dir, from_seq)?;
    let mut sink = EventSink::new(out);
    let mut left = limit.unwrap_or(usize::MAX);
    let mut stdout = std::io::stdout().lock();
    while left > 0 {
        let events = follower.poll(None, BATCH.min(left))?;
        if events.is_empty() {
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        for e in &events {
            if sink.push(&mut stdout, e).is_err() {
                // A closed pipe ends the output.
                return Ok(ExitCode::Ok);
            }
        }
        if stdout.flush().is_err() {
            return Ok(ExitCode::Ok);
        }
        left -= events.len();
    }
    Ok(ExitCode::Ok)
}
