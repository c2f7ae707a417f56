//! Upstreams: a named set of backends (see `backend`), the policy that picks
//! among them (`balance`), their wait queue, and the passive-ejection decision
//! that weighs one backend against its siblings.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::backend::{Backend, Ineligible};
use crate::balance::Balancer;
use crate::clock::nanos_since_epoch;
use crate::cluster::UpstreamSlots;
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::queue::WaitQueue;

/// One upstream: a named set of backends and the policy that picks among them.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub protocol: UpstreamProtocol,
    /// What this upstream was compiled from, to recognise it unchanged on reload.
    pub config: UpstreamConfig,
    /// Serializes passive ejection decisions (see `health::passive`).
    pub ejection_lock: Mutex<()>,
    /// Requests waiting for a free backend; carried across reloads by name.
    pub queue: Option<Arc<WaitQueue>>,
    /// With `max_concurrency_scope: cluster`, the backends' slot sets in Redis.
    pub cluster: Option<UpstreamSlots>,
    /// The upstream of the same name a reload put in this one's place (set
    /// once the reload is live; see `Snapshot::retire_removed`).
    pub replaced_by: OnceLock<Arc<Upstream>>,
}

impl Upstream {
    /// The newest upstream that took this one's place through reloads, for
    /// a request that waited here while its backends were retired; `None`
    /// while this one is live (or was removed without a successor).
    pub fn replacement(&self) -> Option<Arc<Upstream>> {
        let mut newest = Arc::clone(self.replaced_by.get()?);
        while let Some(next) = newest.replaced_by.get() {
            newest = Arc::clone(next);
        }
        Some(newest)
    }

    /// The outcome of the try about to go to backend `index`, to be reported once.
    pub fn outcome(&self, index: usize) -> Outcome<'_> {
        Outcome { upstream: self, index, reported: false }
    }

    /// Records the outcome of one request to backend `index` (passive outlier
    /// detection, see `health::passive`), ejecting it if that was one failure
    /// too many and the upstream's `max_ejection_percent` allows. Returns the
    /// ejection time if it ejected.
    pub fn record_outcome(&self, index: usize, failed: bool) -> Option<Duration> {
        let config = self.config.health.passive.as_ref()?;
        let backend = &self.backends[index];
        let state = &backend.state.passive;
        if !failed {
            state.record_success();
            return None;
        }
        if !state.record_failure(config.consecutive_failures) {
            return None;
        }
        // Rare path: one ejection decision at a time per upstream, so concurrent
        // failures on different backends cannot together exceed the cap.
        let _decision = self.ejection_lock.lock().expect("never poisoned");
        let now = nanos_since_epoch();
        if state.is_ejected(now) {
            return None;
        }
        let ejected = self.backends.iter().filter(|b| b.state.passive.is_ejected(now)).count();
        let allowed = self.backends.len() * config.max_ejection_percent as usize / 100;
        if ejected + 1 > allowed {
            tracing::warn!(upstream = %self.name, backend = %backend.address, ejected, allowed,
                "backend keeps failing but max_ejection_percent is reached; not ejecting");
            return None;
        }
        let duration = state.eject(config, now);
        backend.state.series.ejected();
        tracing::warn!(upstream = %self.name, backend = %backend.address, ?duration, "backend ejected after consecutive failures");
        Some(duration)
    }

    /// A response whose head came (and was counted a success) but whose body
    /// then stalled past `backend_read_timeout`: the try is failed after
    /// all, for passive health, the breaker and the backend's counts.
    pub fn charge_stalled_body(&self, index: usize) {
        self.record_outcome(index, true);
        let backend = &self.backends[index];
        backend.state.count_late_failure();
        if let Some(config) = &backend.breaker {
            backend.state.breaker.on_result(config, nanos_since_epoch(), true);
        }
    }

    /// Why no backend could take a request just now (called after a failed pick).
    pub fn unavailable(&self) -> Unavailable {
        let now = nanos_since_epoch();
        let reasons = self.backends.iter().map(|b| b.ineligible(|| now));
        let mut healthy = reasons.filter(|reason| !reason.is_some_and(Ineligible::is_unhealthy)).peekable();
        if healthy.peek().is_none() {
            Unavailable::NoHealthy
        } else if healthy.all(|reason| reason == Some(Ineligible::CircuitOpen)) {
            Unavailable::CircuitOpen
        } else {
            Unavailable::AllBusy
        }
    }
}

/// Why no backend of an upstream could take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every backend is unhealthy or ejected.
    NoHealthy,
    /// Every backend that is healthy has its circuit open.
    CircuitOpen,
    /// Some backend could serve, but all such are at `max_concurrency`.
    AllBusy,
}

/// Reports one exchange's outcome to passive health detection and the breaker.
/// Dropped without a report (the client left, or the client's own body failed),
/// it gives no verdict: that says nothing about the backend.
pub struct Outcome<'a> {
    upstream: &'a Upstream,
    index: usize,
    reported: bool,
}

impl Outcome<'_> {
    /// The try's verdict: `failed` counts against the backend.
    pub fn report(mut self, failed: bool) {
        self.reported = true;
        self.record(failed);
    }

    fn record(&self, failed: bool) {
        self.upstream.record_outcome(self.index, failed);
        let backend = &self.upstream.backends[self.index];
        backend.state.count_try(failed);
        if let Some(config) = &backend.breaker {
            backend.state.breaker.on_result(config, crate::clock::nanos_since_epoch(), failed);
        }
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.reported {
            // No verdict, but a half-open probe slot is freed.
            self.upstream.backends[self.index].state.breaker.on_abandoned();
        }
    }
}
