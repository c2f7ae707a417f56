//! Circuit breaker per backend: stop sending to a backend that keeps failing,
//! probe it after a while, and resume when it answers again.
//!
//! `closed` -> `open` after `consecutive_failures` failures in a row, or when at
//! least `min_requests` requests in the last `window` failed at `failure_rate` or
//! more. `open` refuses everything for `open_for`, which doubles with each open
//! that follows a failed probe (up to 10x). Then `half-open` admits
//! `half_open_requests` probes at a time: all of them succeeding closes the
//! circuit, any failure opens it again.
//!
//! [`BreakerState`] is the pure state machine: time is passed in, nothing
//! blocks. [`Breaker`] wraps it in a mutex that is only taken when the breaker
//! is configured, and mirrors the phase in an atomic so that the common case, a
//! closed circuit, costs one relaxed load when picking a backend.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::BreakerConfig;

/// Open durations grow to at most this multiple of `open_for`.
const MAX_OPEN_MULTIPLIER: u32 = 10;
/// The failure-rate window is kept as this many buckets.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Closed, Phase::Open, Phase::HalfOpen];

    /// Its name in `/status` and in `switchyard_circuit_state`'s `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BreakerState {
    phase: Phase,
    consecutive_failures: u32,
    /// (bucket start ns, requests, failures) for the failure-rate window.
    buckets: [(u64, u32, u32); BUCKETS],
    open_until: u64,
    /// Opens since the circuit was last closed, for the growing open time.
    opens: u32,
    half_open_admitted: u32,
    half_open_succeeded: u32,
}

impl Default for BreakerState {
    fn default() -> Self {
        BreakerState {
            phase: Phase::Closed,
            consecutive_failures: 0,
            buckets: [(0, 0, 0); BUCKETS],
            open_until: 0,
            opens: 0,
            half_open_admitted: 0,
            half_open_succeeded: 0,
        }
    }
}

impl BreakerState {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether a request may go to the backend now; in half-open this takes one
    /// of the probe slots, to be given back by [`Self::on_result`] or
    /// [`Self::on_abandoned`].
    pub fn admit(&mut self, config: &BreakerConfig, now: u64) -> bool {
        if self.phase == Phase::Open && now >= self.open_until {
            self.phase = Phase::HalfOpen;
            self.half_open_admitted = 0;
            self.half_open_succeeded = 0;
        }
        match self.phase {
            Phase::Closed => true,
            Phase::Open => false,
            Phase::HalfOpen if self.half_open_admitted < config.half_open_requests => {
                self.half_open_admitted += 1;
                true
            }
            Phase::HalfOpen => false,
        }
    }

    /// Records one admitted request's outcome.
    pub fn on_result(&mut self, config: &BreakerConfig, now: u64, failed: bool) {
        match self.phase {
            Phase::Closed => {
                self.count(config, now, failed);
                self.consecutive_failures = if failed { self.consecutive_failures + 1 } else { 0 };
                let (requests, failures) = self.window_totals(config, now);
                let rate_tripped =
                    requests >= config.min_requests && f64::from(failures) >= config.failure_rate * f64::from(requests);
                if self.consecutive_failures >= config.consecutive_failures || rate_tripped {
                    self.open(config, now);
                }
            }
            Phase::HalfOpen if failed => self.open(config, now),
            Phase::HalfOpen => {
                self.half_open_succeeded += 1;
                if self.half_open_succeeded >= config.half_open_requests {
                    *self = BreakerState::default();
                }
            }
            // A request admitted before the circuit opened; its result is stale.
            Phase::Open => {}
        }
    }

    /// An admitted request ended without a verdict (the client left).
    pub fn on_abandoned(&mut self) {
        if self.phase == Phase::HalfOpen {
            self.half_open_admitted = self.half_open_admitted.saturating_sub(1);
        }
    }

    fn open(&mut self, config: &BreakerConfig, now: u64) {
        let multiplier = 1u32.checked_shl(self.opens).unwrap_or(u32::MAX).min(MAX_OPEN_MULTIPLIER);
        self.phase = Phase::Open;
        self.open_until = now + (config.open_for * multiplier).as_nanos() as u64;
        self.opens = self.opens.saturating_add(1);
        self.consecutive_failures = 0;
        self.buckets = [(0, 0, 0); BUCKETS];
    }

    fn bucket_width(config: &BreakerConfig) -> u64 {
        (config.window.as_nanos() as u64 / BUCKETS as u64).max(1)
    }

    fn count(&mut self, config: &BreakerConfig, now: u64, failed: bool) {
        let width = Self::bucket_width(config);
        let start = now - now % width;
        let bucket = &mut self.buckets[(now / width) as usize % BUCKETS];
        if bucket.0 != start {
            *bucket = (start, 0, 0);
        }
        bucket.1 += 1;
        bucket.2 += u32::from(failed);
    }

    fn window_totals(&self, config: &BreakerConfig, now: u64) -> (u32, u32) {
        let oldest = now.saturating_sub(config.window.as_nanos() as u64);
        self.buckets
            .iter()
            .filter(|b| b.1 > 0 && b.0 + Self::bucket_width(config) > oldest)
            .fold((0, 0), |acc, b| (acc.0 + b.1, acc.1 + b.2))
    }

    /// How long until an open circuit lets a probe through.
    pub fn open_remaining(&self, now: u64) -> Option<Duration> {
        (self.phase == Phase::Open && self.open_until > now).then(|| Duration::from_nanos(self.open_until - now))
    }
}

/// A backend's breaker, shared by the request path.
#[derive(Debug, Default)]
pub struct Breaker {
    phase: AtomicU8,
    state: Mutex<BreakerState>,
}

impl Breaker {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Closed,
            1 => Phase::Open,
            _ => Phase::HalfOpen,
        }
    }

    /// Whether the circuit lets this request through now; see [`BreakerState::admit`].
    pub fn admit(&self, config: &BreakerConfig, now: u64) -> bool {
        if self.phase() == Phase::Closed {
            return true;
        }
        self.with(|state| state.admit(config, now))
    }

    /// Whether a request could be admitted now, without taking a probe slot.
    pub fn would_admit(&self, now: u64) -> bool {
        match self.phase() {
            Phase::Closed => true,
            _ => self.with(|state| state.phase == Phase::HalfOpen || now >= state.open_until),
        }
    }

    pub fn on_result(&self, config: &BreakerConfig, now: u64, failed: bool) {
        self.with(|state| state.on_result(config, now, failed));
    }

    pub fn on_abandoned(&self) {
        if self.phase() != Phase::Closed {
            self.with(BreakerState::on_abandoned);
        }
    }

    pub fn snapshot(&self) -> BreakerState {
        self.with(|state| state.clone())
    }

    fn with<R>(&self, f: impl FnOnce(&mut BreakerState) -> R) -> R {
        let mut state = self.state.lock().expect("never poisoned");
        let result = f(&mut state);
        let phase = match state.phase {
            Phase::Closed => 0,
            Phase::Open => 1,
            Phase::HalfOpen => 2,
        };
        self.phase.store(phase, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_requests: 2,
        }
    }

    #[test]
    fn consecutive_failures_open_and_successes_reset_the_streak() {
        let (c, mut b) = (config(), BreakerState::default());
        let now = 100 * S;
        b.on_result(&c, now, true);
        b.on_result(&c, now, true);
        b.on_result(&c, now, false);
        b.on_result(&c, now, true);
        b.on_result(&c, now, true);
        assert_eq!(b.phase(), Phase::Closed);
        b.on_result(&c, now, true);
        assert_eq!(b.phase(), Phase::Open);
        assert!(!b.admit(&c, now + S));
        assert_eq!(b.open_remaining(now + S), Some(Duration::from_secs(4)));
    }

    #[test]
    fn failure_rate_over_the_window_opens_only_with_enough_requests() {
        let (c, mut b) = (config(), BreakerState::default());
        let mut now = 100 * S;
        // Alternating: 50% failures but never 3 in a row.
        for i in 0..9 {
            b.on_result(&c, now, i % 2 == 0);
            now += S / 10;
        }
        assert_eq!(b.phase(), Phase::Closed, "9 requests are below min_requests");
        b.on_result(&c, now, true);
        assert_eq!(b.phase(), Phase::Open, "10 requests, 5 failed");
    }

    #[test]
    fn old_results_leave_the_window() {
        let (c, mut b) = (config(), BreakerState::default());
        let mut now = 100 * S;
        for i in 0..9 {
            b.on_result(&c, now, i % 2 == 0);
        }
        assert_eq!(b.phase(), Phase::Closed);
        now += 11 * S;
        b.on_result(&c, now, true);
        assert_eq!(b.phase(), Phase::Closed, "the 9 old results expired, so this is 1 request, not 10");
    }

    #[test]
    fn half_open_admits_a_few_probes_and_closes_on_their_success() {
        let (c, mut b) = (config(), BreakerState::default());
        let now = 100 * S;
        for _ in 0..3 {
            b.on_result(&c, now, true);
        }
        let later = now + 5 * S;
        assert!(b.admit(&c, later));
        assert_eq!(b.phase(), Phase::HalfOpen);
        assert!(b.admit(&c, later));
        assert!(!b.admit(&c, later), "only two probes at a time");
        b.on_abandoned();
        assert!(b.admit(&c, later), "an abandoned probe frees its slot");
        b.on_result(&c, later, true);
        assert_eq!(b.phase(), Phase::Open, "a failed probe reopens");
        assert_eq!(b.open_remaining(later), Some(Duration::from_secs(10)), "and for twice as long");
        let again = later + 10 * S;
        assert!(b.admit(&c, again) && b.admit(&c, again));
        b.on_result(&c, again, false);
        assert_eq!(b.phase(), Phase::HalfOpen, "one success of two");
        b.on_result(&c, again, false);
        assert_eq!(b.phase(), Phase::Closed, "both probes succeeded");
    }

    #[test]
    fn open_time_caps_at_ten_times() {
        let (c, mut b) = (config(), BreakerState::default());
        let mut now = 100 * S;
        for _ in 0..3 {
            b.on_result(&c, now, true);
        }
        for _ in 0..6 {
            now += b.open_remaining(now).unwrap().as_nanos() as u64;
            assert!(b.admit(&c, now));
            b.on_result(&c, now, true);
        }
        assert_eq!(b.open_remaining(now), Some(Duration::from_secs(50)));
    }

    #[test]
    fn successful_probes_close_and_reset_growth() {
        let (c, mut b) = (config(), BreakerState::default());
        let now = 100 * S;
        for _ in 0..3 {
            b.on_result(&c, now, true);
        }
        let later = now + 5 * S;
        assert!(b.admit(&c, later) && b.admit(&c, later));
        b.on_result(&c, later, false);
        b.on_result(&c, later, false);
        assert_eq!(b.phase(), Phase::Closed);
        for _ in 0..3 {
            b.on_result(&c, later, true);
        }
        assert_eq!(b.open_remaining(later), Some(Duration::from_secs(5)), "growth starts over after closing");
    }
}
