//! `GET /status`: what the runtime is serving and what it has learned about
//! each backend, as JSON for operators and tools.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::Runtime;
use crate::backend::{AdminState, Backend};
use crate::breaker::Phase;
use crate::clock::nanos_since_epoch;
use crate::discovery::DiscoveryStatus;

impl Runtime {
    pub async fn status(&self) -> Status {
        let snapshot = self.live.load_full();
        let now = nanos_since_epoch();
        let listeners = self
            .listener_addrs()
            .await
            .into_iter()
            .map(|(name, addr)| {
                let tls = snapshot.config.listeners.iter().find(|l| *l.name == *name).and_then(|l| l.tls.as_ref());
                ListenerStatus {
                    name: name.to_string(),
                    address: addr,
                    certificates: tls.map(|tls| tls.certificates.iter().map(CertificateStatus::of).collect()),
                }
            })
            .collect();
        let (health_checkers, mut discovery) = {
            let bound = self.bound.lock().await;
            (bound.checkers.len(), bound.discovery.status())
        };
        let mut upstreams = Vec::with_capacity(snapshot.upstreams.len());
        for u in &snapshot.upstreams {
            let in_cluster = match &u.cluster {
                Some(slots) => slots.cluster.slots_in_use(slots).await,
                None => None,
            };
            let mut backends: Vec<BackendStatus> = u.backends.iter().map(|b| BackendStatus::of(b, now)).collect();
            for (backend, count) in backends.iter_mut().zip(in_cluster.iter().flatten()) {
                backend.cluster_slots = Some(*count);
            }
            upstreams.push(UpstreamStatus {
                name: u.name.to_string(),
                policy: u.config.policy.name(),
                max_concurrency_scope: u.config.max_concurrency_scope,
                queue_waiting: u.queue.as_ref().map(|q| q.waiting()),
                discovery: discovery.remove(&*u.name),
                backends,
            });
        }
        Status {
            version: crate::version::VERSION,
            commit: crate::version::COMMIT,
            generation: snapshot.generation,
            draining: self.is_draining(),
            reloads: ReloadCounts {
                success: self.stats.success.load(Ordering::Relaxed),
                error: self.stats.error.load(Ordering::Relaxed),
                unchanged: self.stats.unchanged.load(Ordering::Relaxed),
                last_error: self.stats.last_error.lock().expect("never poisoned").clone(),
            },
            listeners,
            health_checkers,
            cluster: snapshot.cluster.as_deref().map(ClusterStatus::of),
            upstreams,
        }
    }
}

/// `cluster` in `/status`: the Redis link this replica shares slots through.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// The URL, any password in it redacted.
    pub redis: String,
    /// This process's name in Redis (new at every start).
    pub replica: String,
    /// Whether Redis answers; while it does not, `on_unavailable` applies.
    pub available: bool,
    pub on_unavailable: crate::config::OnUnavailable,
    pub lease_seconds: f64,
    /// Slots this replica holds now.
    pub held_slots: usize,
    /// Mean time of a pick's round trip to Redis.
    pub round_trip_ms: Option<f64>,
    pub renewals: u64,
    pub failed_renewals: u64,
    /// Picks made by this replica's own limits, or refused, while Redis was away.
    pub fallbacks: u64,
    /// Slots found missing at a renewal and added back (Redis restarted empty,
    /// or cut off from it for longer than the lease).
    pub slots_lost: u64,
    pub last_error: Option<String>,
}

impl ClusterStatus {
    fn of(cluster: &crate::cluster::Cluster) -> Self {
        let stats = &cluster.stats;
        let trips = stats.round_trips.count();
        ClusterStatus {
            redis: cluster.config().redis_shown(),
            replica: cluster.replica().to_owned(),
            available: cluster.available(),
            on_unavailable: cluster.config().on_unavailable,
            lease_seconds: cluster.config().lease.as_secs_f64(),
            held_slots: cluster.held_slots(),
            round_trip_ms: (trips > 0).then(|| stats.round_trips.sum().as_secs_f64() * 1e3 / trips as f64),
            renewals: stats.renewals_ok.load(Ordering::Relaxed),
            failed_renewals: stats.renewals_failed.load(Ordering::Relaxed),
            fallbacks: stats.fallbacks.load(Ordering::Relaxed),
            slots_lost: stats.slots_lost.load(Ordering::Relaxed),
            last_error: stats.last_error.lock().expect("never poisoned").clone(),
        }
    }
}

/// `GET /status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The crate version and the git commit built from (`switchyard version`).
    pub version: &'static str,
    pub commit: &'static str,
    pub generation: u64,
    pub draining: bool,
    pub reloads: ReloadCounts,
    pub listeners: Vec<ListenerStatus>,
    /// Active checker tasks running: one per distinct (backend address, check).
    pub health_checkers: usize,
    /// `null` without `cluster:`.
    pub cluster: Option<ClusterStatus>,
    pub upstreams: Vec<UpstreamStatus>,
}

#[derive(Debug, Serialize)]
pub struct ReloadCounts {
    pub success: u64,
    pub error: u64,
    /// File change events whose content was the same as the running config's
    /// (an editor's touch, a swap file): nothing was reloaded.
    pub unchanged: u64,
    /// The last failed reload's error, until a reload succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: SocketAddr,
    /// The listener's TLS certificates in the config's order (the first is
    /// the default); `null` for a plain listener.
    pub certificates: Option<Vec<CertificateStatus>>,
}

#[derive(Debug, Serialize)]
pub struct CertificateStatus {
    pub cert: String,
    pub names: Vec<String>,
    /// `2027-01-01T00:00:00Z`.
    pub not_after: String,
    /// Negative once it has expired.
    pub expires_in_seconds: i64,
}

impl CertificateStatus {
    fn of(certificate: &crate::config::tls::Certificate) -> Self {
        CertificateStatus {
            cert: certificate.cert_path.display().to_string(),
            names: certificate.names.clone(),
            not_after: crate::config::tls::date(certificate.not_after),
            expires_in_seconds: certificate.expires_in_seconds(std::time::SystemTime::now()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub policy: &'static str,
    /// `replica` or `cluster`: where `max_concurrency` holds.
    pub max_concurrency_scope: crate::config::ConcurrencyScope,
    /// Requests waiting for a free backend; `null` without a queue.
    pub queue_waiting: Option<usize>,
    /// Where the backends come from and how the last lookups went; `null`
    /// for listed backends.
    pub discovery: Option<DiscoveryStatus>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// The weight it gets now: lower during slow start.
    pub effective_weight: f64,
    pub max_concurrency: Option<u32>,
    pub in_flight: u32,
    /// Tries sent to it since it joined (kept across reloads), and those that
    /// failed: connect failures, resets, timeouts and 5xx answers.
    pub requests: u64,
    pub failed_requests: u64,
    /// The operator's override: `enabled`, `draining` or `disabled`.
    pub admin_state: AdminState,
    /// While draining: true once nothing is in flight (safe to stop the bot);
    /// `null` otherwise.
    pub drained: Option<bool>,
    pub latency_ms: Option<f64>,
    /// Eligible by health: the active check passes (or there is none) and not ejected.
    pub healthy: bool,
    /// Whether a policy may pick it now, and why or why not, in words.
    pub eligible: bool,
    pub why: String,
    /// Seconds until a passive ejection ends; `null` when not ejected.
    pub ejected_for_seconds: Option<f64>,
    /// Passive detection's current streak of failed requests.
    pub consecutive_request_failures: u32,
    pub active_check: Option<ActiveCheckStatus>,
    /// `closed`, `open` or `half-open`; `null` without a circuit breaker.
    pub circuit: Option<Phase>,
    /// Seconds until an open circuit lets a probe through.
    pub circuit_open_for_seconds: Option<f64>,
    /// Slots taken on it by every replica (cluster-scoped upstreams, while
    /// Redis answers); `null` otherwise.
    pub cluster_slots: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ActiveCheckStatus {
    pub healthy: bool,
    pub last_passed: Option<bool>,
    /// Why the last check passed or failed: `status 503`, `timeout after 1s`, ...
    pub last_reason: Option<String>,
    pub last_checked_seconds_ago: Option<f64>,
    pub consecutive_passes: u32,
    pub consecutive_failures: u32,
}

impl BackendStatus {
    fn of(backend: &Backend, now: u64) -> Self {
        let seconds = |ns: u64| ns as f64 / 1e9;
        let ejected_until = backend.state.passive.ejected_until();
        let (requests, failed_requests) = backend.state.tries();
        let (eligible, why) = crate::explain::backend_verdict(backend, now);
        BackendStatus {
            eligible,
            why,
            address: backend.address.to_string(),
            weight: backend.weight,
            effective_weight: backend.effective_weight(now),
            max_concurrency: (backend.max_concurrency != u32::MAX).then_some(backend.max_concurrency),
            in_flight: backend.in_flight(),
            requests,
            failed_requests,
            admin_state: backend.state.admin(),
            drained: (backend.state.admin() == AdminState::Draining).then(|| backend.in_flight() == 0),
            latency_ms: backend.state.latency.estimate().map(|ns| ns / 1e6),
            healthy: backend.is_healthy(now),
            ejected_for_seconds: (ejected_until > now).then(|| seconds(ejected_until - now)),
            consecutive_request_failures: backend.state.passive.consecutive_failures(),
            circuit: backend.breaker.map(|_| backend.state.breaker.snapshot().phase()),
            circuit_open_for_seconds: backend
                .breaker
                .and_then(|_| backend.state.breaker.snapshot().open_remaining(now))
                .map(|d| d.as_secs_f64()),
            cluster_slots: None,
            active_check: backend.check.as_ref().map(|check| {
                let last = check.last();
                let (consecutive_passes, consecutive_failures) = check.consecutive();
                ActiveCheckStatus {
                    healthy: check.is_healthy(),
                    last_passed: last.as_ref().map(|l| l.passed),
                    last_reason: last.as_ref().map(|l| l.reason.clone()),
                    last_checked_seconds_ago: last.as_ref().map(|l| seconds(now.saturating_sub(l.at_nanos))),
                    consecutive_passes,
                    consecutive_failures,
                }
            }),
        }
    }
}
