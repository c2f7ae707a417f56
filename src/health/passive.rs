//! Passive outlier detection: ejecting a backend that fails real requests.
//!
//! Every forwarded request reports its outcome. `consecutive_failures` failures
//! in a row (connect failure, reset, timeout, 5xx) eject the backend for
//! `ejection_time`; each ejection that follows soon after the previous one
//! doubles the time, capped at 10x. A backend that has stayed out of trouble
//! for 10 x `ejection_time` since its last ejection starts again from 1x. At most
//! `floor(backends x max_ejection_percent / 100)` backends of an upstream are
//! ejected at once; further failing backends stay in rotation (and keep failing
//! fast) rather than leaving the upstream with nothing.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::PassiveConfig;

/// Ejection time grows to at most this multiple of `ejection_time`.
const MAX_EJECTION_MULTIPLIER: u32 = 10;

#[derive(Debug, Default)]
pub struct PassiveState {
    consecutive_failures: AtomicU32,
    /// End of the current or last ejection, in ns since epoch; 0 if never ejected.
    ejected_until: AtomicU64,
    /// Ejections in the current streak, for the back-off.
    streak: AtomicU32,
}

impl PassiveState {
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Acquire)
    }

    /// End of the current or last ejection (ns since epoch), 0 if never ejected.
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Acquire)
    }

    /// Ejects until `until` (ns since epoch), for tests of what policies do
    /// around an ejected backend.
    #[cfg(test)]
    pub fn eject_until_for_test(&self, until: u64) {
        self.ejected_until.store(until, Ordering::Release);
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn record_success(&self) {
        // Read first: most requests succeed, and an unconditional store would
        // bounce this cache line between cores on every request.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; true when the streak has reached `threshold`.
    pub fn record_failure(&self, threshold: u32) -> bool {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1) >= threshold
    }

    /// Ejects until `now + duration` where duration follows the back-off.
    pub fn eject(&self, config: &PassiveConfig, now: u64) -> Duration {
        let previous_end = self.ejected_until.load(Ordering::Acquire);
        let quiet_for = now.saturating_sub(previous_end);
        let reset_after = config.ejection_time.as_nanos() as u64 * u64::from(MAX_EJECTION_MULTIPLIER);
        if previous_end == 0 || quiet_for > reset_after {
            self.streak.store(0, Ordering::Relaxed);
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed);
        let multiplier = 1u32.checked_shl(streak).unwrap_or(u32::MAX).min(MAX_EJECTION_MULTIPLIER);
        let duration = config.ejection_time * multiplier;
        self.ejected_until.store(now + duration.as_nanos() as u64, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_doubles_then_caps_and_resets_after_a_quiet_period() {
        let config =
            PassiveConfig { consecutive_failures: 2, ejection_time: Duration::from_secs(1), max_ejection_percent: 100 };
        let state = PassiveState::default();
        let s = 1_000_000_000u64;
        let mut now = 100 * s;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let duration = state.eject(&config, now);
            seen.push(duration.as_secs());
            assert!(state.is_ejected(now));
            now += duration.as_nanos() as u64 + s;
            assert!(!state.is_ejected(now));
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 10, 10]);
        now += 11 * s;
        assert_eq!(state.eject(&config, now), Duration::from_secs(1), "a long quiet period resets the back-off");
    }

    #[test]
    fn failures_must_be_consecutive() {
        let state = PassiveState::default();
        assert!(!state.record_failure(3));
        assert!(!state.record_failure(3));
        state.record_success();
        assert!(!state.record_failure(3));
        assert!(!state.record_failure(3));
        assert!(state.record_failure(3));
    }
}
