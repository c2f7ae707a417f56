//! The clock of backend state: health, ejection, breaker windows, slow start,
//! latency decay, retry budgets and tunnel idleness all read time here.
//!
//! It is the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, ticked
//! every 1-4 ms): reading it costs a few nanoseconds against about 20 for the
//! precise clock, and every duration measured with it is a second or more
//! (decay over 10 s, ejections, breaker windows), so a few milliseconds of
//! resolution change nothing. Latencies and request durations, which need
//! precision, are measured with `Instant` where they are taken.
//!
//! Unit tests read tokio's clock instead (see `monotonic_nanos`), so that
//! time-driven state can be tested on paused time.
//!
//! Also here: wall-clock dates as logs and messages write them.

use std::sync::OnceLock;

/// Monotonic nanoseconds since the first call, at the coarse clock's resolution.
pub fn nanos_since_epoch() -> u64 {
    monotonic_nanos()
}

#[cfg(not(test))]
fn monotonic_nanos() -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let now = coarse_monotonic_nanos();
    now.saturating_sub(*EPOCH.get_or_init(|| now))
}

/// Unit tests read tokio's clock instead, so that a test on paused time
/// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) moves
/// backend state's time together with its timers; outside a paused runtime it
/// is the precise monotonic clock. Every test measures from one base, set
/// before any of their clocks started: a paused clock stands at its runtime's
/// creation, so an epoch taken at a later first reading (by a test on real
/// time) would hold a paused test's time at zero.
#[cfg(test)]
#[allow(clippy::disallowed_types)] // the base tokio's clock is measured from
fn monotonic_nanos() -> u64 {
    // A base a minute before the first reading: a paused runtime's clock starts
    // at its creation, which may precede the first reading in another test.
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let now = std::time::Instant::now();
        now.checked_sub(std::time::Duration::from_secs(60)).unwrap_or(now)
    });
    tokio::time::Instant::now().into_std().saturating_duration_since(base).as_nanos() as u64
}

fn coarse_monotonic_nanos() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists
    // on every Linux since 2.6.32 and cannot fail with a valid pointer.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    debug_assert_eq!(result, 0);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch, in UTC (the civil
/// date from days, after Howard Hinnant's `civil_from_days`).
pub fn utc_date_time(seconds: u64) -> [u8; 19] {
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let mut text = [0u8; 19];
    let mut out = std::io::Cursor::new(&mut text[..]);
    use std::io::Write as _;
    let _ = write!(out, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", time / 3600, time % 3600 / 60, time % 60);
    text
}

#[cfg(test)]
#[allow(clippy::disallowed_types)] // the coarse clock is checked against the precise one
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        for (seconds, expected) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_764_265_681, "2025-11-27T17:48:01"),
            (4_102_531_199, "2100-01-01T23:59:59"),
        ] {
            assert_eq!(std::str::from_utf8(&utc_date_time(seconds)).unwrap(), expected);
        }
    }

    #[test]
    fn follows_the_precise_clock_within_its_resolution() {
        // Each coarse reading is taken between two precise ones, so a thread
        // preempted in between widens the bounds instead of failing the test.
        let (before_start, coarse_start, after_start) = (Instant::now(), coarse_monotonic_nanos(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (before_end, coarse_end, after_end) = (Instant::now(), coarse_monotonic_nanos(), Instant::now());
        let coarse = coarse_end - coarse_start;
        let shortest = before_end.duration_since(after_start).as_nanos() as u64;
        let longest = after_end.duration_since(before_start).as_nanos() as u64;
        // One tick (at most 4 ms at HZ=250, 10 ms at HZ=100) either way.
        let tick = 10_000_000;
        assert!(
            coarse + tick >= shortest && coarse <= longest + tick,
            "coarse {coarse} ns against precise {shortest}..{longest} ns"
        );
    }
}
