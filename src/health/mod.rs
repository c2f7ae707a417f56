//! Backend health as state: the active checks' verdicts ([`CheckStatus`], fed
//! by the checkers in `probe`), passive outlier detection from real traffic
//! ([`passive`]), and slow start.
//!
//! A backend is *eligible* when its active check (if any) says healthy and it is
//! not ejected. All of it is state the proxy learned, so it lives outside the
//! config snapshot: active results in a [`CheckStatus`] shared by every upstream
//! that checks the same address the same way, passive state in the backend's
//! `BackendState`. Both are carried across reloads.
//!
//! Slow start: a backend that was added by a reload, came back healthy, or
//! returned from an ejection takes a linearly growing share of requests over
//! `slow_start`, from 10% of its weight to all of it.
//!
//! No panic mode: when no backend of an upstream is eligible, requests fail fast
//! with `503 no_healthy_backend` instead of being spread over unhealthy backends
//! (Envoy's panic threshold). A bot that fails its check cannot run the job; a
//! fast 503 lets the client retry or queue elsewhere, and `/status` says why.

pub mod passive;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::nanos_since_epoch;

/// Share of its weight a backend gets at the start of its slow-start window.
pub const SLOW_START_FLOOR: f64 = 0.1;

/// The latest result of one active checker, read lock-free by the request path.
#[derive(Debug)]
pub struct CheckStatus {
    healthy: AtomicBool,
    /// When the backend last became healthy (ns since epoch); 0 if healthy from the start.
    healthy_since: AtomicU64,
    consecutive_passes: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Only the checker writes this, once per check; `/status` reads it.
    last: Mutex<Option<CheckResult>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub passed: bool,
    /// Why, in words: `status 200`, `status 503`, `timeout after 1s`, `connection refused`.
    pub reason: String,
    /// When the check completed, in ns on `clock`'s coarse clock (`/status`
    /// shows how long ago, in seconds).
    #[serde(skip)]
    pub at_nanos: u64,
}

impl Default for CheckStatus {
    fn default() -> Self {
        // Healthy until proven otherwise: a proxy that starts (or a backend that is
        // added) takes traffic at once, as HAProxy does; a dead backend is marked
        // down after `unhealthy_after` failed checks.
        CheckStatus {
            healthy: AtomicBool::new(true),
            healthy_since: AtomicU64::new(0),
            consecutive_passes: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            last: Mutex::new(None),
        }
    }
}

/// What a transition was, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    BecameHealthy,
    BecameUnhealthy,
}

impl CheckStatus {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn healthy_since(&self) -> u64 {
        self.healthy_since.load(Ordering::Acquire)
    }

    pub fn consecutive(&self) -> (u32, u32) {
        (self.consecutive_passes.load(Ordering::Relaxed), self.consecutive_failures.load(Ordering::Relaxed))
    }

    pub fn last(&self) -> Option<CheckResult> {
        self.last.lock().expect("never poisoned").clone()
    }

    /// Applies one check result with the thresholds; only the checker calls this.
    pub fn record(&self, passed: bool, reason: String, healthy_after: u32, unhealthy_after: u32) -> Transition {
        let now = nanos_since_epoch();
        *self.last.lock().expect("never poisoned") = Some(CheckResult { passed, reason, at_nanos: now });
        let healthy = self.is_healthy();
        if passed {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            let passes = self.consecutive_passes.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if !healthy && passes >= healthy_after {
                self.healthy_since.store(now, Ordering::Release);
                self.healthy.store(true, Ordering::Release);
                return Transition::BecameHealthy;
            }
        } else {
            self.consecutive_passes.store(0, Ordering::Relaxed);
            let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if healthy && failures >= unhealthy_after {
                self.healthy.store(false, Ordering::Release);
                return Transition::BecameUnhealthy;
            }
        }
        Transition::None
    }
}

/// The fraction of its weight a backend gets `now`, given when it last became
/// available (`since`, ns since epoch; 0 means always).
pub fn slow_start_factor(slow_start: Option<Duration>, since: u64, now: u64) -> f64 {
    let Some(window) = slow_start else { return 1.0 };
    if since == 0 || now >= since + window.as_nanos() as u64 {
        return 1.0;
    }
    let elapsed = now.saturating_sub(since) as f64 / window.as_nanos() as f64;
    elapsed.max(SLOW_START_FLOOR)
}

/// Human wording of a duration for check reasons: `1s`, `250ms`.
pub fn describe(duration: Duration) -> String {
    crate::text::duration(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_health_only_after_enough_results() {
        let status = CheckStatus::default();
        assert!(status.is_healthy());
        assert_eq!(status.record(false, "x".into(), 2, 3), Transition::None);
        assert_eq!(status.record(false, "x".into(), 2, 3), Transition::None);
        assert_eq!(status.record(true, "ok".into(), 2, 3), Transition::None, "a pass resets the failure streak");
        for _ in 0..2 {
            assert_eq!(status.record(false, "x".into(), 2, 3), Transition::None);
        }
        assert_eq!(status.record(false, "status 503".into(), 2, 3), Transition::BecameUnhealthy);
        assert!(!status.is_healthy());
        assert_eq!(status.record(true, "ok".into(), 2, 3), Transition::None);
        assert_eq!(status.record(true, "ok".into(), 2, 3), Transition::BecameHealthy);
        assert!(status.healthy_since() > 0);
        assert_eq!(status.last().unwrap().reason, "ok");
    }

    #[test]
    fn slow_start_ramps_linearly_from_the_floor() {
        let window = Some(Duration::from_secs(10));
        let s = 1_000_000_000u64;
        assert_eq!(slow_start_factor(None, 5, 6), 1.0);
        assert_eq!(slow_start_factor(window, 0, 100 * s), 1.0);
        assert_eq!(slow_start_factor(window, 100 * s, 100 * s), SLOW_START_FLOOR);
        assert!((slow_start_factor(window, 100 * s, 105 * s) - 0.5).abs() < 1e-9);
        assert_eq!(slow_start_factor(window, 100 * s, 110 * s), 1.0);
    }
}
