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
