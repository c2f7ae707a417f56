//! The clock of backend state: health, ejection, breaker windows, slow start,
//! latency decay, retry budgets and tunnel idleness all read time here.
//!
//! It is the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, ticked
//! every 1-4 ms): reading it costs a few nanoseconds against about 20 for the
//! precise clock, and every duration measured with it is a second or more
//! (decay over 10 s, ejections, breaker windows), so a few milliseconds of
//! resolution change nothing. Latencies and request durations, which need
//! precision, are measured with `Instant` where they are taken.

use std::sync::OnceLock;

/// Monotonic nanoseconds since the first call, at the coarse clock's resolution.
pub fn nanos_since_epoch() -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let now = coarse_monotonic_nanos();
    now.saturating_sub(*EPOCH.get_or_init(|| now))
}

fn coarse_monotonic_nanos() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists
    // on every Linux since 2.6.32 and cannot fail with a valid pointer.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    debug_assert_eq!(result, 0);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn follows_the_precise_clock_within_its_resolution() {
        let (coarse_start, precise_start) = (nanos_since_epoch(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let coarse = nanos_since_epoch() - coarse_start;
        let precise = precise_start.elapsed().as_nanos() as u64;
        // One tick (at most 4 ms at HZ=250, 10 ms at HZ=100) either way.
        assert!(coarse.abs_diff(precise) <= 10_000_000, "coarse {coarse} ns against precise {precise} ns");
    }
}
