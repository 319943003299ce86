//! Time sources. The ledger stamps events itself; tests inject a [`ManualClock`].

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Microseconds since the Unix epoch; the unit of every timestamp in the log.
pub type Micros = i64;

/// Microseconds in a second: what a `ttl_seconds` is multiplied by to give a deadline.
pub const MICROS_PER_SECOND: i64 = 1_000_000;

/// Microseconds in a day.
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Where the ledger reads the time that stamps its events; injectable so tests control it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, in microseconds since the Unix epoch.
    fn now_micros(&self) -> Micros;
}

/// The operating system's wall clock: what a real ledger runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> Micros {
        Utc::now().timestamp_micros()
    }
}

/// 2026-01-01T00:00:00Z, where [`ManualClock::at_default_epoch`] starts.
const DEFAULT_EPOCH_US: Micros = 1_767_225_600_000_000;

/// A clock that moves only when told to; cheap to clone, clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Micros) -> Self {
        ManualClock { now: Arc::new(AtomicI64::new(start)) }
    }

    /// Starts at 2026-01-01T00:00:00Z, a fixed instant so tests are reproducible.
    pub fn at_default_epoch() -> Self {
        Self::new(DEFAULT_EPOCH_US)
    }

    /// Moves the clock to `t` (backwards too: the ledger must cope with a clock that jumps back).
    pub fn set(&self, t: Micros) {
        self.now.store(t, Ordering::SeqCst);
    }

    /// Moves the clock forward by whole seconds.
    pub fn advance_seconds(&self, seconds: i64) {
        self.now.fetch_add(seconds * MICROS_PER_SECOND, Ordering::SeqCst);
    }

    /// Moves the clock forward by `micros`.
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
    // Every grant's report formats two timestamps under the ledger's lock; chrono's general
    // formatter took 2% of a grant. Years 1970..=9999 are written by hand, the rest by chrono.
    if (0..FORMAT_FAST_END_US).contains(&t) {
        return format_micros_fast(t);
    }
    match DateTime::<Utc>::from_timestamp_micros(t) {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None => format!("@{t}us"),
    }
}

/// 10000-01-01T00:00:00Z: from here on a year has five digits.
const FORMAT_FAST_END_US: Micros = 253_402_300_800_000_000;

/// `format_micros` for `0 <= t < FORMAT_FAST_END_US`.
#[allow(clippy::expect_used, reason = "the text is built from ASCII digits and separators only")]
fn format_micros_fast(t: Micros) -> String {
    String::from_utf8(fast_text(t).to_vec()).expect("digits and separators are ASCII")
}

/// The instant `t` as [`format_micros`] writes it, without allocating: what report
/// serialisation writes straight into its output.
pub(crate) struct MicrosText(pub(crate) Micros);

impl std::fmt::Display for MicrosText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if (0..FORMAT_FAST_END_US).contains(&self.0) {
            let text = fast_text(self.0);
            return f.write_str(std::str::from_utf8(&text).map_err(|_| std::fmt::Error)?);
        }
        f.write_str(&format_micros(self.0))
    }
}

/// The instant `t` as a date-time, for typed report fields. Clamped to chrono's range (about
/// 262,000 years either side of year 0), which only a crafted snapshot can exceed.
pub(crate) fn datetime(t: Micros) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(t).unwrap_or(if t < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// The bytes of `format_micros` for `0 <= t < FORMAT_FAST_END_US`.
fn fast_text(t: Micros) -> [u8; 27] {
    debug_assert!((0..FORMAT_FAST_END_US).contains(&t));
    let (days, micros_of_day) = (t / MICROS_PER_DAY, t % MICROS_PER_DAY);
    // Days to a civil date (Howard Hinnant's `civil_from_days`), with eras of 400 years.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (year, seconds, micros) =
        (year as u32, (micros_of_day / MICROS_PER_SECOND) as u32, (micros_of_day % MICROS_PER_SECOND) as u32);
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    // Two digits at a time, by constant divisors (multiplications once compiled).
    let mut put = |at: usize, v: u32| {
        debug_assert!(v < 100);
        text[at] = b'0' + (v / 10) as u8;
        text[at + 1] = b'0' + (v % 10) as u8;
    };
    put(0, year / 100);
    put(2, year % 100);
    put(5, month as u32);
    put(8, day as u32);
    put(11, seconds / 3600);
    put(14, seconds / 60 % 60);
    put(17, seconds % 60);
    put(20, micros / 10_000);
    put(22, micros / 100 % 100);
    put(24, micros % 100);
    text
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
        "s" => MICROS_PER_SECOND,
        "m" => 60 * MICROS_PER_SECOND,
        "h" => 3_600 * MICROS_PER_SECOND,
        "d" => MICROS_PER_DAY,
        "w" => 7 * MICROS_PER_DAY,
        _ => return None,
    };
    n.checked_mul(unit_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written formatter agrees with chrono's across its whole range, at the edges
    /// of days, months, leap years and centuries.
    #[test]
    fn fast_formatting_matches_chrono() {
        let chrono_format = |t: Micros| {
            DateTime::<Utc>::from_timestamp_micros(t).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        let day_us = 86_400_000_000i64;
        let mut times = vec![0, 1, 999_999, FORMAT_FAST_END_US - 1, 1_767_225_600_000_000];
        // Every day's first and last microsecond over leap years and the 2100 non-leap year...
        for d in (0..).map(|i| i * 7 + 10_950).take_while(|&d| d < 47_482 + 800) {
            times.extend([d * day_us, d * day_us - 1, d * day_us + 43_261_123_456]);
        }
        // ...and pseudo-random instants across the range.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            times.push((x % FORMAT_FAST_END_US as u64) as i64);
        }
        for t in times {
            assert_eq!(format_micros(t), chrono_format(t), "{t}");
        }
        assert_eq!(format_micros(FORMAT_FAST_END_US), chrono_format(FORMAT_FAST_END_US));
        assert_eq!(format_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

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
