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
pub const REQUEST_BODY_BYTES_TOTAL: &str = "switchyard_request_body_bytes_total";
pub const RESPONSE_BODY_BYTES_TOTAL: &str = "switchyard_response_body_bytes_total";
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
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "switchyard_certificate_expiry_timestamp_seconds";
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
pub const TRACE_SPANS_TOTAL: &str = "switchyard_trace_spans_total";
pub const ACCESS_DENIED_TOTAL: &str = "switchyard_access_denied_total";
// The process's own, under the names every Prometheus client library uses.
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START_TIME_SECONDS: &str = "process_start_time_seconds";
pub const PROCESS_THREADS: &str = "process_threads";

/// The metric names every proxy exports from its first scrape, whatever its
/// config (the dashboard's set); TLS, certificate and discovery series exist
/// only where the config has them.
pub const ALL: [&str; 25] = [
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    REQUEST_BODY_BYTES_TOTAL,
    RESPONSE_BODY_BYTES_TOTAL,
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
    PROCESS_CPU_SECONDS_TOTAL,
    PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_START_TIME_SECONDS,
    PROCESS_THREADS,
];

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Every name the proxy exports, with its type and its `# HELP` text: the
/// contract docs/operations.md lists and the dashboard may use.
pub const CONTRACT: [(&str, Kind, &str); 39] = [
    (REQUESTS_TOTAL, Kind::Counter, "Finished client requests by route, upstream, last backend tried and status code (code=\"error\": no response)."),
    (REQUEST_DURATION_SECONDS, Kind::Histogram, "Client-observed request duration, from arrival until the response body ended."),
    (REQUEST_BODY_BYTES_TOTAL, Kind::Counter, "Request body bytes received from clients, by route and upstream."),
    (RESPONSE_BODY_BYTES_TOTAL, Kind::Counter, "Response body bytes sent to clients, by route and upstream."),
    (UPSTREAM_DURATION_SECONDS, Kind::Histogram, "Per try: from sending to the backend until its response head or the failure."),
    (IN_FLIGHT, Kind::Gauge, "Requests a backend is serving now."),
    (BACKEND_HEALTHY, Kind::Gauge, "1 when the backend is eligible by health, 0 when unhealthy or ejected."),
    (BACKEND_EJECTIONS_TOTAL, Kind::Counter, "Passive-health ejections of the backend."),
    (BACKEND_ADMIN_STATE, Kind::Gauge, "The backend's admin override: 1 for its current state (enabled, draining or disabled), 0 for the others."),
    (HEALTH_CHECKS_TOTAL, Kind::Counter, "Active health checks of the backend, by result (pass or fail)."),
    (CIRCUIT_STATE, Kind::Gauge, "The backend's circuit breaker: 1 for its current state (closed, open or half-open), 0 for the others."),
    (RETRIES_TOTAL, Kind::Counter, "Retries sent, by the condition that caused them."),
    (RETRY_BUDGET_EXHAUSTED_TOTAL, Kind::Counter, "Retries not sent because the route's retry budget was spent."),
    (QUEUE_WAITING, Kind::Gauge, "Requests waiting in the upstream's queue for a backend."),
    (QUEUE_REJECTED_TOTAL, Kind::Counter, "Queued requests refused, by reason (full or timeout)."),
    (CONFIG_RELOADS_TOTAL, Kind::Counter, "Config reloads, by result."),
    (CONFIG_GENERATION, Kind::Gauge, "Generation of the running config: 1 at start, +1 per applied reload."),
    (CONNECTIONS_OPEN, Kind::Gauge, "Open client connections, by listener."),
    (TLS_HANDSHAKES_TOTAL, Kind::Counter, "Client TLS handshakes, by listener and result (ok, failed, timeout)."),
    (CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, Kind::Gauge, "When a listener certificate expires, in seconds since the Unix epoch."),
    (DISCOVERY_LOOKUPS_TOTAL, Kind::Counter, "DNS lookups of an upstream's discovery, by result."),
    (DISCOVERED_BACKENDS, Kind::Gauge, "Backends the upstream serves from its last good DNS lookup."),
    (DISCOVERY_DROPPED_TOTAL, Kind::Counter, "Records a successful DNS lookup left out, by reason, counted at every lookup."),
    (CLUSTER_AVAILABLE, Kind::Gauge, "1 while the cluster's Redis answers, 0 while on_unavailable applies."),
    (CLUSTER_SLOTS_HELD, Kind::Gauge, "Cluster slots this replica holds in Redis now."),
    (CLUSTER_REDIS_DURATION_SECONDS, Kind::Histogram, "Round trip to Redis of each cluster-scoped pick."),
    (CLUSTER_LEASE_RENEWALS_TOTAL, Kind::Counter, "Cluster lease renewals, by result."),
    (CLUSTER_FALLBACKS_TOTAL, Kind::Counter, "Cluster-scoped picks made by this replica's own limits, or refused, while Redis was unreachable."),
    (CLUSTER_SLOTS_LOST_TOTAL, Kind::Counter, "Cluster slots found missing at a renewal and added back."),
    (BUILD_INFO, Kind::Gauge, "Always 1; the labels say which build answers."),
    (ACCESS_DENIED_TOTAL, Kind::Counter, "Requests refused by access rules, by route (- for a listener's) and reason (address, rate_limited)."),
    (TRACE_SPANS_TOTAL, Kind::Counter, "Spans of recorded requests, by result: exported, failed (the collector refused or did not answer) or dropped (too many waiting)."),
    (PROCESS_CPU_SECONDS_TOTAL, Kind::Counter, "Total user and system CPU time spent in seconds."),
    (PROCESS_RESIDENT_MEMORY_BYTES, Kind::Gauge, "Resident memory size in bytes."),
    (PROCESS_VIRTUAL_MEMORY_BYTES, Kind::Gauge, "Virtual memory size in bytes."),
    (PROCESS_OPEN_FDS, Kind::Gauge, "Number of open file descriptors."),
    (PROCESS_MAX_FDS, Kind::Gauge, "Maximum number of open file descriptors."),
    (PROCESS_START_TIME_SECONDS, Kind::Gauge, "Start time of the process since the Unix epoch in seconds."),
    (PROCESS_THREADS, Kind::Gauge, "Number of OS threads in the process."),
];

/// The `# HELP` text of a contract name.
pub fn help(name: &str) -> Option<&'static str> {
    CONTRACT.iter().find(|(known, _, _)| *known == name).map(|(_, _, help)| *help)
}

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
            let handle = builder.install_recorder().ok()?;
            CONTRACT.iter().for_each(describe);
            Some(handle)
        })
        .as_ref()
}

/// Gives the exporter a contract name's type and help text, for its
/// `# HELP` line.
fn describe(&(name, kind, help): &(&'static str, Kind, &'static str)) {
    match kind {
        Kind::Counter => metrics::describe_counter!(name, help),
        Kind::Gauge => metrics::describe_gauge!(name, help),
        Kind::Histogram => metrics::describe_histogram!(name, help),
    }
}

pub fn label(value: &std::sync::Arc<str>) -> SharedString {
    SharedString::from_shared(std::sync::Arc::clone(value))
}

/// `switchyard_request_duration_seconds{route,upstream}`, registered per route.
pub fn request_duration(route: &std::sync::Arc<str>, upstream: &std::sync::Arc<str>) -> Histogram {
    metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => label(route), "upstream" => label(upstream))
}

/// A route's body byte counters. They are the exporter's, keyed by route and
/// upstream, so they carry across reloads as the duration histogram does.
#[derive(Debug)]
pub struct BodyBytes {
    /// `switchyard_request_body_bytes_total`: from the client.
    pub received: metrics::Counter,
    /// `switchyard_response_body_bytes_total`: to the client.
    pub sent: metrics::Counter,
}

/// A route's [`BodyBytes`], registered once per route.
pub fn body_bytes(route: &std::sync::Arc<str>, upstream: &std::sync::Arc<str>) -> BodyBytes {
    BodyBytes {
        received: metrics::counter!(REQUEST_BODY_BYTES_TOTAL, "route" => label(route), "upstream" => label(upstream)),
        sent: metrics::counter!(RESPONSE_BODY_BYTES_TOTAL, "route" => label(route), "upstream" => label(upstream)),
    }
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

/// A request refused by a listener's or route's access rules.
pub fn access_denied(route: &str, reason: &'static str) {
    metrics::counter!(ACCESS_DENIED_TOTAL, "route" => route.to_owned(), "reason" => reason).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_name_is_listed_once_with_a_one_line_help_and_its_conventional_suffix() {
        let mut names = std::collections::BTreeSet::new();
        for (name, kind, help) in CONTRACT {
            assert!(names.insert(name), "{name} is listed twice");
            assert!(!help.is_empty() && !help.contains('\n'), "{name}'s help");
            assert_eq!(
                name.ends_with("_total"),
                kind == Kind::Counter,
                "{name}: counters, and only they, end in _total"
            );
        }
        for name in ALL {
            assert!(names.contains(name), "{name} is exported but not in the contract");
        }
    }
}
