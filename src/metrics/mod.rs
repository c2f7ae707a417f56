//! Every metric name in one place (they are a contract: dashboards depend on
//! them), typed helpers to record them, and the Prometheus recorder.
//!
//! Metrics go through the `metrics` facade; [`install`] sets up the Prometheus
//! exporter once per process and returns the handle `/metrics` renders.
//!
//! Labels are only ever config names (route, upstream, listener), backend
//! addresses from the config, status codes and fixed words: nothing a client
//! controls, so the number of series is bounded by the config. Handles used on
//! every request (duration histograms) are registered once when a config is
//! compiled. Gauges are refreshed from the live snapshot every second and before
//! each scrape, and a gauge not refreshed for [`GAUGE_IDLE`] is dropped: that is
//! how a removed backend's gauges leave `/metrics` after a reload. Counters and
//! histograms labelled with a backend are not in the exporter at all but in
//! [`series`], held by the backend's state, so they leave with the backend.

pub mod series;

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Histogram, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const REQUESTS_TOTAL: &str = "switchyard_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "switchyard_request_duration_seconds";
pub const UPSTREAM_DURATION_SECONDS: &str = "switchyard_upstream_duration_seconds";
pub const IN_FLIGHT: &str = "switchyard_in_flight";
pub const BACKEND_HEALTHY: &str = "switchyard_backend_healthy";
pub const BACKEND_EJECTIONS_TOTAL: &str = "switchyard_backend_ejections_total";
pub const BACKEND_ADMIN_STATE: &str = "switchyard_backend_admin_state";
pub const HEALTH_CHECKS_TOTAL: &str = "switchyard_health_checks_total";
pub const CIRCUIT_STATE: &str = "switchyard_circuit_state";
pub const RETRIES_TOTAL: &str = "switchyard_retries_total";
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "switchyard_retry_budget_exhausted_total";
pub const QUEUE_WAITING: &str = "switchyard_queue_waiting";
pub const QUEUE_REJECTED_TOTAL: &str = "switchyard_queue_rejected_total";
pub const CONFIG_RELOADS_TOTAL: &str = "switchyard_config_reloads_total";
pub const CONFIG_GENERATION: &str = "switchyard_config_generation";
pub const CONNECTIONS_OPEN: &str = "switchyard_connections_open";
pub const TLS_HANDSHAKES_TOTAL: &str = "switchyard_tls_handshakes_total";
pub const CERTIFICATE_EXPIRY_SECONDS: &str = "switchyard_certificate_expiry_seconds";
pub const DISCOVERY_LOOKUPS_TOTAL: &str = "switchyard_discovery_lookups_total";
pub const DISCOVERED_BACKENDS: &str = "switchyard_discovered_backends";
pub const DISCOVERY_DROPPED_TOTAL: &str = "switchyard_discovery_dropped_total";
pub const CLUSTER_AVAILABLE: &str = "switchyard_cluster_available";
pub const CLUSTER_SLOTS_HELD: &str = "switchyard_cluster_slots_held";
pub const CLUSTER_REDIS_DURATION_SECONDS: &str = "switchyard_cluster_redis_duration_seconds";
pub const CLUSTER_LEASE_RENEWALS_TOTAL: &str = "switchyard_cluster_lease_renewals_total";
pub const CLUSTER_FALLBACKS_TOTAL: &str = "switchyard_cluster_fallbacks_total";
pub const CLUSTER_SLOTS_LOST_TOTAL: &str = "switchyard_cluster_slots_lost_total";
pub const BUILD_INFO: &str = "switchyard_build_info";

/// The metric names every proxy exports from its first scrape, whatever its
/// config (the dashboard's set); TLS, certificate and discovery series exist
/// only where the config has them.
pub const ALL: [&str; 17] = [
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    UPSTREAM_DURATION_SECONDS,
    IN_FLIGHT,
    BACKEND_HEALTHY,
    BACKEND_EJECTIONS_TOTAL,
    BACKEND_ADMIN_STATE,
    HEALTH_CHECKS_TOTAL,
    CIRCUIT_STATE,
    RETRIES_TOTAL,
    RETRY_BUDGET_EXHAUSTED_TOTAL,
    QUEUE_WAITING,
    QUEUE_REJECTED_TOTAL,
    CONFIG_RELOADS_TOTAL,
    CONFIG_GENERATION,
    CONNECTIONS_OPEN,
    BUILD_INFO,
];

/// Duration buckets in seconds, for both millisecond RPC calls and bot jobs
/// that run for minutes: roughly x2.5 steps from 5 ms to 10 minutes.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A gauge not refreshed for this long is dropped from `/metrics`.
pub const GAUGE_IDLE: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (first call) and returns its
/// handle. `None` if another recorder was installed first (an embedding program).
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &DURATION_BUCKETS)
                .ok()?
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE));
            builder.install_recorder().ok()
        })
        .as_ref()
}

pub fn label(value: &std::sync::Arc<str>) -> SharedString {
    SharedString::from_shared(std::sync::Arc::clone(value))
}

/// `switchyard_request_duration_seconds{route,upstream}`, registered per route.
pub fn request_duration(route: &std::sync::Arc<str>, upstream: &std::sync::Arc<str>) -> Histogram {
    metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => label(route), "upstream" => label(upstream))
}

pub fn connections_open(listener: &std::sync::Arc<str>) -> metrics::Gauge {
    metrics::gauge!(CONNECTIONS_OPEN, "listener" => label(listener))
}

/// A client's TLS handshake ended: `ok`, `failed` or `timeout`.
pub fn tls_handshake(listener: &str, result: &'static str) {
    metrics::counter!(TLS_HANDSHAKES_TOTAL, "listener" => listener.to_owned(), "result" => result).increment(1);
}

pub fn config_reload(success: bool) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => if success { "success" } else { "error" }).increment(1);
}

pub fn config_generation(generation: u64) {
    metrics::gauge!(CONFIG_GENERATION).set(generation as f64);
}

/// One DNS lookup of an upstream's `discovery` ended.
pub fn discovery_lookup(upstream: &str, success: bool) {
    metrics::counter!(DISCOVERY_LOOKUPS_TOTAL, "upstream" => upstream.to_owned(),
        "result" => if success { "success" } else { "error" })
    .increment(1);
}

/// Records a lookup's answer left out, by reason: `over_max_backends`,
/// `unusable_address`, `own_address`, `failed_target`.
pub fn discovery_dropped(upstream: &str, reason: &'static str, count: usize) {
    metrics::counter!(DISCOVERY_DROPPED_TOTAL, "upstream" => upstream.to_owned(), "reason" => reason)
        .increment(count as u64);
}

pub fn retry(route: &str, upstream: &str, reason: &'static str) {
    metrics::counter!(RETRIES_TOTAL, "route" => route.to_owned(), "upstream" => upstream.to_owned(),
        "reason" => reason)
    .increment(1);
}

pub fn retry_budget_exhausted(route: &str, upstream: &str) {
    metrics::counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "route" => route.to_owned(), "upstream" => upstream.to_owned())
        .increment(1);
}

pub fn queue_rejected(upstream: &str, reason: &'static str) {
    metrics::counter!(QUEUE_REJECTED_TOTAL, "upstream" => upstream.to_owned(), "reason" => reason).increment(1);
}

/// Folds the histogram samples recorded since the last call into their
/// buckets. The exporter keeps each raw sample until this runs (or a scrape
/// renders), so without it an unscraped proxy's memory grows with every
/// request. Called every second.
pub fn upkeep() {
    if let Some(handle) = install() {
        handle.run_upkeep();
    }
}
