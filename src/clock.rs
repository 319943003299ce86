//! Time sources. The ledger stamps events itself; tests inject a [`ManualClock`].

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Microseconds since the Unix epoch; the unit of every timestamp in the log.
pub type Micros = i64;

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_micros(&self) -> Micros;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> Micros {
        Utc::now().timestamp_micros()
    }
}

/// A clock that moves only when told to; cheap to clone, clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Micros) -> Self {
        ManualClock { now: Arc::new(AtomicI64::new(start)) }
    }

    /// Starts at 2026-01-01T00:00:00Z, a fixed instant so tests are reproducible.
    pub fn at_default_epoch() -> Self {
        Self::new(1_767_225_600_000_000)
    }

    pub fn set(&self, t: Micros) {
        self.now.store(t, Ordering::SeqCst);
    }

    pub fn advance_seconds(&self, seconds: i64) {
        self.now.fetch_add(seconds * 1_000_000, Ordering::SeqCst);
    }

    pub fn advance_micros(&self, micros: i64) {
        self.now.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> Micros {
        self.now.load(Ordering::SeqCst)
    }
}

/// RFC 3339 with microseconds and a `Z`, the form every timestamp takes in JSON output.
pub fn format_micros(t: Micros) -> String {
    match DateTime::<Utc>::from_timestamp_micros(t) {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None => format!("@{t}us"),
    }
}

/// Parses RFC 3339 (`2026-11-27T03:12:00Z`) or a relative form against `now`:
/// `-15m`, `-2h`, `-1d`, `-30s`, `+5m`, or `now`.
pub fn parse_time(field: &str, text: &str, now: Micros) -> crate::Result<Micros> {
    let t = text.trim();
    if t == "now" {
        return Ok(now);
    }
    if let Some(rest) = t.strip_prefix('-').or_else(|| t.strip_prefix('+')) {
        let sign = if t.starts_with('-') { -1 } else { 1 };
        let micros = parse_duration_micros(rest).ok_or_else(|| {
            crate::Error::invalid(
                field,
                format!("{text:?} is not a time: use RFC 3339 (2026-11-27T03:12:00Z), `now`, or a relative form such as -15m, -2h, -1d, -30s"),
            )
        })?;
        return Ok(now + sign * micros);
    }
    DateTime::parse_from_rfc3339(t)
        .map(|dt| dt.with_timezone(&Utc).timestamp_micros())
        .map_err(|e| {
            crate::Error::invalid(
                field,
                format!("{text:?} is not a time ({e}): use RFC 3339 (2026-11-27T03:12:00Z), `now`, or a relative form such as -15m, -2h, -1d, -30s"),
            )
        })
}

/// `90s`, `15m`, `2h`, `1d`, `500ms` → microseconds. Returns None for anything else.
pub fn parse_duration_micros(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits.parse().ok()?;
    let unit_micros: i64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        "w" => 7 * 86_400_000_000,
        _ => return None,
    };
    n.checked_mul(unit_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let now = 1_000_000_000_000;
        assert_eq!(parse_time("at", "-15m", now).unwrap(), now - 900_000_000);
        assert_eq!(parse_time("at", "+1h", now).unwrap(), now + 3_600_000_000);
        assert_eq!(parse_time("at", "now", now).unwrap(), now);
        assert_eq!(parse_time("at", "2026-01-01T00:00:00Z", now).unwrap(), 1_767_225_600_000_000);
        let err = parse_time("at", "yesterday", now).unwrap_err().to_string();
        assert!(err.contains("at") && err.contains("RFC 3339"), "{err}");
        assert!(parse_duration_micros("15x").is_none());
        assert_eq!(format_micros(1_767_225_600_000_000), "2026-01-01T00:00:00.000000Z");
    }
}
