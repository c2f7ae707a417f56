//! A backend: one entry of an upstream in the current config (address,
//! weight, limit), and what the proxy *learns* about it ([`BackendState`]:
//! in-flight count, latency estimate, health, ejection, breaker), kept behind
//! an `Arc` keyed by (upstream, address) so that a reload that keeps the
//! backend hands the same state to the new snapshot. The request path reads
//! and updates that state through atomics; the breaker's window is the one
//! lock, taken once per response when a breaker is configured.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::Breaker;
use crate::clock::nanos_since_epoch;
use crate::cluster::SlotLease;
use crate::config::BreakerConfig;
use crate::health::passive::PassiveState;
use crate::health::{slow_start_factor, CheckStatus};
use crate::metrics::series::BackendSeries;
use crate::queue::WaitQueue;

#[derive(Debug)]
pub struct Backend {
    /// `host:port` as configured; the backend's identity in metrics and logs.
    pub address: Arc<str>,
    /// Its connections' key in the worker pools: the address, plus the
    /// upstream's TLS settings when it has them (a plain connection never
    /// serves a TLS upstream, nor one TLS setting another's).
    pub pool_key: Arc<str>,
    /// The same address, pre-parsed for building request URIs without reparsing.
    pub authority: http::uri::Authority,
    pub weight: u32,
    /// `u32::MAX` when the config sets no limit.
    pub max_concurrency: u32,
    pub state: Arc<BackendState>,
    /// The active check's verdict, shared with other upstreams checking the same
    /// address the same way; `None` without an active check.
    pub check: Option<Arc<CheckStatus>>,
    pub slow_start: Option<Duration>,
    pub breaker: Option<BreakerConfig>,
    /// The upstream's wait queue, told when this backend frees a slot.
    pub queue: Option<Arc<WaitQueue>>,
    /// The upstream's running in-flight total, kept only when a policy needs
    /// it (bounded load).
    pub load: Option<Arc<UpstreamLoad>>,
}

/// The key of `address`'s connections in the pools when reached with `tls`:
/// the address, plus the TLS setting when there is one (a plain connection
/// never serves a TLS upstream, nor one TLS setting another's).
pub fn pool_key(address: &Arc<str>, tls: Option<&crate::config::tls::UpstreamTls>) -> Arc<str> {
    match tls {
        Some(tls) => format!("{address}#tls-{:016x}", tls.fingerprint).into(),
        None => Arc::clone(address),
    }
}

/// Why a backend cannot take a request now (see [`Backend::ineligible`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// Its active check fails.
    CheckFailing,
    /// A reload removed it; requests still on an older snapshot start nothing new on it.
    Retired,
    /// Passive detection ejected it, until this time (ns, `clock`).
    Ejected { until: u64 },
    /// Its circuit breaker refuses requests now: open, or half-open with every
    /// probe slot taken.
    CircuitOpen,
    /// At `max_concurrency`.
    Full,
    /// It answered that it is busy with work from elsewhere (429 or 503 with
    /// `Retry-After`) while this proxy believed it free: until this time (ns, `clock`).
    Busy { until: u64 },
    /// Taken out by the operator (`drain` or `disable` on the admin API).
    Admin(AdminState),
}

impl Ineligible {
    /// Out for its health (check, reload, ejection) or by the operator, not
    /// for being busy or for its breaker: nothing a queue could wait for.
    pub fn is_unhealthy(self) -> bool {
        matches!(
            self,
            Ineligible::CheckFailing | Ineligible::Retired | Ineligible::Ejected { .. } | Ineligible::Admin(_)
        )
    }
}

/// The operator's override of a backend, set through the admin API and kept
/// with its state across reloads while the backend stays in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes requests as its health and limits allow.
    Enabled,
    /// Takes no new request; those in flight finish.
    Draining,
    /// Out at once, for maintenance; those in flight still finish (the proxy
    /// never cuts a running job).
    Disabled,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [AdminState::Enabled, AdminState::Draining, AdminState::Disabled];

    /// Its name in the admin API and in `switchyard_backend_admin_state`'s
    /// `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    fn from_u8(value: u8) -> AdminState {
        match value {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }
}

/// An upstream's total in-flight count and how many of its backends can serve,
/// so that bounded load's mean costs O(1) per pick, not a walk over every
/// backend. The total is exact (kept by every slot taken and given back); the
/// serving count is recounted at most every [`UpstreamLoad::RECOUNT`].
#[derive(Debug, Default)]
pub struct UpstreamLoad {
    in_flight: AtomicU64,
    /// Backends that can serve, and the in-flight requests on those that cannot
    /// (still finishing), as of `counted_at`.
    serving: AtomicU64,
    not_serving_in_flight: AtomicU64,
    counted_at: AtomicU64,
}

impl UpstreamLoad {
    /// How stale the serving count may get: health changes reach the mean
    /// within this.
    pub const RECOUNT: Duration = Duration::from_millis(100);

    /// (in-flight on serving backends, serving backends), recounting the
    /// latter if it is older than [`Self::RECOUNT`].
    pub fn serving_load(&self, backends: &[Arc<Backend>]) -> (u64, u64) {
        let now = nanos_since_epoch();
        let counted_at = self.counted_at.load(Ordering::Relaxed);
        if counted_at == 0 || now.saturating_sub(counted_at) > Self::RECOUNT.as_nanos() as u64 {
            let (mut serving, mut elsewhere) = (0, 0);
            for backend in backends {
                // Serving: eligible, or merely full.
                if matches!(backend.ineligible(|| now), None | Some(Ineligible::Full)) {
                    serving += 1;
                } else {
                    elsewhere += u64::from(backend.in_flight());
                }
            }
            self.serving.store(serving, Ordering::Relaxed);
            self.not_serving_in_flight.store(elsewhere, Ordering::Relaxed);
            self.counted_at.store(now.max(1), Ordering::Relaxed);
        }
        let total = self.in_flight.load(Ordering::Relaxed);
        (total.saturating_sub(self.not_serving_in_flight.load(Ordering::Relaxed)), self.serving.load(Ordering::Relaxed))
    }
}

impl Backend {
    /// A backend with fresh state and no health checks, breaker, queue or
    /// metrics: for benchmarks and tests of the policies on their own.
    pub fn detached(config: &crate::config::BackendConfig) -> Backend {
        Backend {
            address: config.address.as_str().into(),
            pool_key: config.address.as_str().into(),
            authority: config.address.parse().expect("a valid backend address"),
            weight: config.weight,
            max_concurrency: config.max_concurrency.unwrap_or(u32::MAX),
            state: Arc::default(),
            check: None,
            slow_start: None,
            breaker: None,
            queue: None,
            load: None,
        }
    }

    /// Reserves one request slot if the backend is healthy, not ejected, and
    /// below both its own `max_concurrency` and `cap` (a policy's extra bound,
    /// such as bounded load). The slot is held until the returned guard drops.
    pub fn try_acquire(self: &Arc<Self>, cap: u32) -> Option<InFlightGuard> {
        if !self.is_healthy_now() || self.state.admin() != AdminState::Enabled {
            return None;
        }
        let busy_until = self.state.busy_until();
        if busy_until != 0 && nanos_since_epoch() < busy_until {
            return None;
        }
        let limit = self.max_concurrency.min(cap);
        let in_flight = &self.state.in_flight;
        // A compare-and-swap, not load-then-add: two requests racing for the last
        // slot of a one-job bot must not both get it.
        in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        // The breaker is asked last: in half-open, admitting takes a probe slot,
        // which must only happen for a request that will really be sent.
        if let Some(config) = &self.breaker {
            if !self.state.breaker.admit(config, nanos_since_epoch()) {
                // Given back without waking the queue: no capacity was freed, and
                // a wake here would send waiters round in circles.
                in_flight.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
        }
        if let Some(load) = &self.load {
            load.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        // One reference count for the whole slot: the backend holds its state,
        // queue and upstream total.
        Some(InFlightGuard { backend: Arc::clone(self), lease: None })
    }

    /// Whether the circuit breaker (if any) would let a request through now.
    pub fn circuit_allows(&self, now: u64) -> bool {
        self.breaker.is_none() || self.state.breaker.would_admit(now)
    }

    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// Why the backend cannot take a request now, or `None` if it can: the one
    /// definition of eligible. `now` is called only when a condition needs the
    /// time (an ejection ever happened, a breaker is configured): the clock is
    /// the costly part of asking.
    pub fn ineligible(&self, now: impl Fn() -> u64) -> Option<Ineligible> {
        match self.state.admin() {
            AdminState::Enabled => {}
            out => return Some(Ineligible::Admin(out)),
        }
        if let Some(reason) = self.unhealthy(&now) {
            return Some(reason);
        }
        if self.breaker.is_some() && !self.state.breaker.would_admit(now()) {
            return Some(Ineligible::CircuitOpen);
        }
        if self.in_flight() >= self.max_concurrency {
            return Some(Ineligible::Full);
        }
        let busy_until = self.state.busy_until();
        if busy_until != 0 && now() < busy_until {
            return Some(Ineligible::Busy { until: busy_until });
        }
        None
    }

    /// The health part of [`Self::ineligible`]: its active check, a reload, an
    /// ejection.
    fn unhealthy(&self, now: &impl Fn() -> u64) -> Option<Ineligible> {
        if self.check.as_ref().is_some_and(|c| !c.is_healthy()) {
            return Some(Ineligible::CheckFailing);
        }
        if self.state.is_retired() {
            return Some(Ineligible::Retired);
        }
        let until = self.state.passive.ejected_until();
        if until != 0 && now() < until {
            return Some(Ineligible::Ejected { until });
        }
        None
    }

    /// Healthy by its active check (if any), not ejected, and still in the
    /// config.
    pub fn is_healthy(&self, now: u64) -> bool {
        self.unhealthy(&|| now).is_none()
    }

    /// [`Self::is_healthy`] at the current time.
    pub fn is_healthy_now(&self) -> bool {
        self.unhealthy(&nanos_since_epoch).is_none()
    }

    /// Whether a policy may pick this backend now (see [`Self::ineligible`]).
    pub fn is_available(&self) -> bool {
        self.ineligible(nanos_since_epoch).is_none()
    }

    /// The share of its weight the backend gets now (below 1 during slow start).
    pub fn ramp(&self, now: u64) -> f64 {
        if self.slow_start.is_none() {
            return 1.0;
        }
        let healthy_since = self.check.as_ref().map_or(0, |c| c.healthy_since());
        let ejection_end = self.state.passive.ejected_until();
        let since = self.state.added_at.max(healthy_since).max(ejection_end);
        slow_start_factor(self.slow_start, since, now)
    }

    pub fn effective_weight(&self, now: u64) -> f64 {
        f64::from(self.weight) * self.ramp(now)
    }
}

/// What the proxy has learned about a backend; survives reloads that keep it.
#[derive(Debug, Default)]
pub struct BackendState {
    in_flight: AtomicU32,
    /// Tries with a verdict, and those that failed (connect failure, reset,
    /// timeout, 5xx), since the backend joined: the status page's counts. Next
    /// to `in_flight`, whose cache line every request takes anyway.
    tries: AtomicU64,
    failed_tries: AtomicU64,
    pub latency: PeakEwma,
    pub passive: PassiveState,
    pub breaker: Breaker,
    /// When a reload added the backend (ns since epoch), for slow start; 0 for
    /// backends present from the start.
    pub added_at: u64,
    /// Set when a reload removed the backend: requests still running on an
    /// older snapshot (queued, or between retries) must not start a new try on it.
    retired: AtomicBool,
    /// An [`AdminState`], as its discriminant.
    admin: AtomicU8,
    /// Until when it said it is busy with work from elsewhere (ns, `clock`); 0: never.
    busy_until: AtomicU64,
    /// Its counters and histogram in `/metrics`, gone when it goes.
    pub series: BackendSeries,
}

impl BackendState {
    pub fn added_now() -> Self {
        // At least 1: 0 means present from the start, and the clock reads 0
        // within its first tick.
        BackendState { added_at: nanos_since_epoch().max(1), ..BackendState::default() }
    }

    /// It answered busy (see [`Ineligible::Busy`]): it takes nothing new
    /// until `until`.
    pub fn mark_busy(&self, until: u64) {
        self.busy_until.fetch_max(until, Ordering::Relaxed);
    }

    pub fn busy_until(&self) -> u64 {
        self.busy_until.load(Ordering::Relaxed)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// A try's verdict, for the counts.
    pub fn count_try(&self, failed: bool) {
        self.tries.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed_tries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A try already counted as a success failed after all (its response
    /// body stalled).
    pub fn count_late_failure(&self) {
        self.failed_tries.fetch_add(1, Ordering::Relaxed);
    }

    /// (tries, failed tries) since the backend joined.
    pub fn tries(&self) -> (u64, u64) {
        (self.tries.load(Ordering::Relaxed), self.failed_tries.load(Ordering::Relaxed))
    }

    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Acquire))
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Ordering::Release);
    }
}

/// Holds one in-flight slot of a backend; releases it on drop, which happens when
/// the response body has been fully sent (or the exchange failed).
#[derive(Debug)]
pub struct InFlightGuard {
    /// The backend as the snapshot that picked it has it: its state (carried
    /// across reloads), and that snapshot's queue and upstream total.
    backend: Arc<Backend>,
    /// The slot in Redis of a cluster-scoped upstream's backend; boxed, so
    /// that every other request's guard stays two pointers wide.
    lease: Option<Box<SlotLease>>,
}

impl InFlightGuard {
    pub fn state(&self) -> &BackendState {
        &self.backend.state
    }

    /// Holds `lease` for as long as this slot, releasing it first.
    pub fn with_lease(mut self, lease: SlotLease) -> Self {
        self.lease = Some(Box::new(lease));
        self
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // The cluster's slot goes first, so that the waiter woken below finds
        // it free in Redis as soon as the release gets there.
        drop(self.lease.take());
        let backend = &self.backend;
        backend.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(load) = &backend.load {
            load.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(queue) = &backend.queue {
            queue.slot_freed();
        }
    }
}

/// Peak-sensitive exponentially weighted moving average of response latency, as in
/// Finagle's and linkerd's `PeakEwma` balancer: a sample above the current estimate
/// replaces it at once (so a backend that turns slow is avoided at once), samples
/// below it pull it down gradually, and the estimate decays over time so that a
/// backend that was slow once is tried again later.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// Estimate in nanoseconds as `f64` bits; 0 means no sample yet.
    estimate_bits: AtomicU64,
    /// When the estimate was last updated, in nanoseconds since [`epoch`].
    updated_at: AtomicU64,
}

/// How quickly old samples lose weight (linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);

impl PeakEwma {
    pub fn observe(&self, sample: Duration) {
        let now = nanos_since_epoch();
        let sample = sample.as_nanos() as f64;
        let current = self.decayed(now);
        let next = if current == 0.0 || sample > current {
            sample
        } else {
            // Weight of the old estimate after `elapsed`; with no time elapsed the old
            // estimate is kept whole, so a burst of samples cannot jump it around.
            let elapsed = now.saturating_sub(self.updated_at.load(Ordering::Relaxed)) as f64;
            let keep = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            current * keep + sample * (1.0 - keep)
        };
        // Racing updates may lose one sample; an estimate does not need every one.
        self.estimate_bits.store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.updated_at.store(now, Ordering::Relaxed);
    }

    /// The current estimate in nanoseconds, or `None` before the first sample.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate_at(nanos_since_epoch())
    }

    /// [`Self::estimate`] at `now` (ns since epoch), for callers that have it.
    pub fn estimate_at(&self, now: u64) -> Option<f64> {
        let value = self.decayed(now);
        (value > 0.0).then_some(value)
    }

    fn decayed(&self, now: u64) -> f64 {
        let estimate = f64::from_bits(self.estimate_bits.load(Ordering::Relaxed));
        if estimate == 0.0 {
            return 0.0;
        }
        let elapsed = now.saturating_sub(self.updated_at.load(Ordering::Relaxed)) as f64;
        // Floor at 1ns so a known-but-decayed backend never reads as "no sample".
        (estimate * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(max: u32) -> Arc<Backend> {
        Arc::new(Backend::detached(&crate::config::BackendConfig {
            address: "127.0.0.1:1".into(),
            weight: 1,
            max_concurrency: Some(max),
        }))
    }

    #[test]
    fn ineligible_names_the_first_reason_and_policies_agree() {
        let bot = backend(1);
        let now = nanos_since_epoch() + 1_000_000_000;
        assert_eq!(bot.ineligible(|| now), None);
        let slot = bot.try_acquire(u32::MAX).unwrap();
        assert_eq!(bot.ineligible(|| now), Some(Ineligible::Full));
        assert!(!bot.is_available() && bot.is_healthy(now), "busy is not unhealthy");
        let config = crate::config::PassiveConfig {
            consecutive_failures: 1,
            ejection_time: Duration::from_secs(10),
            max_ejection_percent: 100,
        };
        bot.state.passive.eject(&config, now);
        let reason = bot.ineligible(|| now);
        assert!(matches!(reason, Some(Ineligible::Ejected { .. })), "health comes before being full: {reason:?}");
        assert!(reason.unwrap().is_unhealthy() && !bot.is_healthy(now));
        assert_eq!(bot.ineligible(|| now + 11_000_000_000), Some(Ineligible::Full), "the ejection ends");
        drop(slot);
        bot.state.retire();
        assert_eq!(bot.ineligible(|| now), Some(Ineligible::Retired));
        assert!(bot.try_acquire(u32::MAX).is_none(), "try_acquire agrees");
    }

    #[test]
    fn acquire_respects_limits_and_releases_on_drop() {
        let b = backend(2);
        let first = b.try_acquire(u32::MAX).unwrap();
        let _second = b.try_acquire(u32::MAX).unwrap();
        assert!(b.try_acquire(u32::MAX).is_none());
        assert!(!b.is_available());
        drop(first);
        assert!(b.try_acquire(1).is_none(), "the policy cap applies too");
        assert!(b.try_acquire(3).is_some());
    }

    #[tokio::test]
    async fn a_breaker_refusal_frees_the_slot_without_waking_the_queue() {
        let config = BreakerConfig { consecutive_failures: 1, ..BreakerConfig::default() };
        let queue = Arc::new(WaitQueue::default());
        let b = Arc::new(Backend {
            breaker: Some(config),
            queue: Some(Arc::clone(&queue)),
            ..Arc::into_inner(backend(1)).unwrap()
        });
        b.state.breaker.on_result(&config, nanos_since_epoch(), true);
        let ticket = queue.join(crate::queue::Priority::Normal, 10, false).unwrap();
        assert!(b.try_acquire(u32::MAX).is_none(), "the open circuit refuses");
        assert_eq!(b.in_flight(), 0, "the slot was given back");
        let mut waiting = Box::pin(ticket.wait());
        assert!(futures_util::FutureExt::now_or_never(&mut waiting).is_none(), "nobody was woken for nothing");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let ewma = PeakEwma::default();
        assert_eq!(ewma.estimate(), None);
        ewma.observe(Duration::from_millis(10));
        let first = ewma.estimate().unwrap();
        ewma.observe(Duration::from_millis(100));
        let peak = ewma.estimate().unwrap();
        assert!(peak > 9.0e7, "a slower sample is taken at once: {peak}");
        ewma.observe(Duration::from_millis(1));
        assert!(ewma.estimate().unwrap() > first, "a fast sample right after does not erase the peak");
    }
}
