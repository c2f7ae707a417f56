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
        }
    }
}
