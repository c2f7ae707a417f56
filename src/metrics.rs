//! Every metric name in one place (they are a contract: dashboards depend on
//! them), typed helpers to record them, and the Prometheus recorder.
//!
//! Metrics go through the `metrics` facade; [`install`] sets up the Prometheus
//! exporter once per process and returns the handle `/metrics` renders.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONFIG_RELOADS_TOTAL: &str = "switchyard_config_reloads_total";
pub const CONFIG_GENERATION: &str = "switchyard_config_generation";

/// Installs the process-wide Prometheus recorder (first call) and returns its
/// handle. `None` if another recorder was installed first (an embedding program).
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            builder.install_recorder().ok()
        })
        .as_ref()
}

pub fn config_reload(success: bool) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => if success { "success" } else { "error" }).increment(1);
}

pub fn config_generation(generation: u64) {
    metrics::gauge!(CONFIG_GENERATION).set(generation as f64);
}

pub const BACKEND_HEALTHY: &str = "switchyard_backend_healthy";
pub const BACKEND_EJECTIONS_TOTAL: &str = "switchyard_backend_ejections_total";
pub const HEALTH_CHECKS_TOTAL: &str = "switchyard_health_checks_total";

pub fn health_check_counter(upstream: &str, backend: &str, passed: bool) -> metrics::Counter {
    metrics::counter!(HEALTH_CHECKS_TOTAL, "upstream" => upstream.to_owned(), "backend" => backend.to_owned(),
        "result" => if passed { "pass" } else { "fail" })
}

pub fn backend_ejected(upstream: &str, backend: &str) {
    metrics::counter!(BACKEND_EJECTIONS_TOTAL, "upstream" => upstream.to_owned(), "backend" => backend.to_owned())
        .increment(1);
}

/// Sets `switchyard_backend_healthy` for every backend of `snapshot`; called on
/// a timer, because ejections end by the clock, not by an event.
pub fn backend_health(snapshot: &crate::state::Snapshot) {
    let now = crate::upstream::nanos_since_epoch();
    for upstream in &snapshot.upstreams {
        for backend in &upstream.backends {
            let healthy = if backend.is_healthy(now) { 1.0 } else { 0.0 };
            metrics::gauge!(BACKEND_HEALTHY, "upstream" => upstream.name.to_string(), "backend" => backend.address.to_string())
                .set(healthy);
            if backend.breaker.is_some() {
                metrics::gauge!(CIRCUIT_STATE, "upstream" => upstream.name.to_string(), "backend" => backend.address.to_string())
                    .set(backend.state.breaker.phase().gauge());
            }
        }
        if let Some(queue) = &upstream.queue {
            metrics::gauge!(QUEUE_WAITING, "upstream" => upstream.name.to_string()).set(queue.waiting() as f64);
        }
    }
}

pub const RETRIES_TOTAL: &str = "switchyard_retries_total";
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "switchyard_retry_budget_exhausted_total";
pub const QUEUE_WAITING: &str = "switchyard_queue_waiting";
pub const QUEUE_REJECTED_TOTAL: &str = "switchyard_queue_rejected_total";
pub const CIRCUIT_STATE: &str = "switchyard_circuit_state";

pub fn retry(route: &str, upstream: &str, reason: crate::config::RetryOn) {
    metrics::counter!(RETRIES_TOTAL, "route" => route.to_owned(), "upstream" => upstream.to_owned(),
        "reason" => crate::retry::reason_label(reason))
    .increment(1);
}

pub fn retry_budget_exhausted(route: &str, upstream: &str) {
    metrics::counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "route" => route.to_owned(), "upstream" => upstream.to_owned())
        .increment(1);
}

pub fn queue_rejected(upstream: &str, reason: &'static str) {
    metrics::counter!(QUEUE_REJECTED_TOTAL, "upstream" => upstream.to_owned(), "reason" => reason).increment(1);
}
