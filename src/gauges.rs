//! The live snapshot as Prometheus series: the counters whose labels the
//! config determines, made to exist at 0, the gauges of backend and
//! upstream state, refreshed every second and before each scrape (see
//! `metrics` for the names and why gauges expire), and the families kept in
//! the backends' own state, written from the snapshot at each scrape, with
//! the process's own.

use metrics::gauge;

use crate::backend::AdminState;
use crate::breaker::Phase;
use crate::metrics::series::{Family, UNROUTED_REQUESTS};
use crate::metrics::{
    config_generation, label, BACKEND_ADMIN_STATE, BACKEND_EJECTIONS_TOTAL, BACKEND_HEALTHY,
    CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, CIRCUIT_STATE, CLUSTER_AVAILABLE, CLUSTER_FALLBACKS_TOTAL,
    CLUSTER_LEASE_RENEWALS_TOTAL, CLUSTER_REDIS_DURATION_SECONDS, CLUSTER_SLOTS_HELD, CLUSTER_SLOTS_LOST_TOTAL,
    CONFIG_RELOADS_TOTAL, CONNECTIONS_OPEN, DISCOVERED_BACKENDS, DISCOVERY_DROPPED_TOTAL, DISCOVERY_LOOKUPS_TOTAL,
    HEALTH_CHECKS_TOTAL, IN_FLIGHT, PROCESS_CPU_SECONDS_TOTAL, PROCESS_MAX_FDS, PROCESS_OPEN_FDS,
    PROCESS_RESIDENT_MEMORY_BYTES, PROCESS_START_TIME_SECONDS, PROCESS_THREADS, PROCESS_VIRTUAL_MEMORY_BYTES,
    QUEUE_REJECTED_TOTAL, QUEUE_WAITING, REQUESTS_TOTAL, RETRIES_TOTAL, RETRY_BUDGET_EXHAUSTED_TOTAL,
    UPSTREAM_DURATION_SECONDS,
};
use crate::state::Snapshot;

/// An enumeration's series: 1 for the state it is in, 0 for the others.
fn one_if(current: bool) -> f64 {
    if current {
        1.0
    } else {
        0.0
    }
}

/// Makes every counter whose labels the config determines exist at 0, so that
/// dashboards and alerts see a series from startup (or from the reload that
/// added its config), not from its first event. Called at start and after
/// every reload that changed the config.
pub fn register_config_series(snapshot: &Snapshot) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => "success").increment(0);
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => "error").increment(0);
    if snapshot.tracing.is_some() {
        for result in ["exported", "failed", "dropped"] {
            metrics::counter!(crate::metrics::TRACE_SPANS_TOTAL, "result" => result).increment(0);
        }
    }
    for upstream in &snapshot.upstreams {
        let config = &upstream.config;
        if config.discovery.is_some() {
            for result in ["success", "error"] {
                metrics::counter!(DISCOVERY_LOOKUPS_TOTAL, "upstream" => label(&upstream.name), "result" => result)
                    .increment(0);
            }
            for reason in ["over_max_backends", "unusable_address", "own_address", "failed_target"] {
                metrics::counter!(DISCOVERY_DROPPED_TOTAL, "upstream" => label(&upstream.name), "reason" => reason)
                    .increment(0);
            }
        }
        if config.queue.is_some() {
            for reason in ["full", "timeout"] {
                metrics::counter!(QUEUE_REJECTED_TOTAL, "upstream" => label(&upstream.name), "reason" => reason)
                    .increment(0);
            }
        }
    }
    if !snapshot.listener_access.is_empty() {
        metrics::counter!(crate::metrics::ACCESS_DENIED_TOTAL, "route" => "-", "reason" => "address").increment(0);
    }
    for route in snapshot.router.routes() {
        let reasons = [(!route.access.is_empty(), "address"), (route.rate_limit.is_some(), "rate_limited")];
        for (_, reason) in reasons.into_iter().filter(|(configured, _)| *configured) {
            metrics::counter!(crate::metrics::ACCESS_DENIED_TOTAL, "route" => label(&route.name), "reason" => reason)
                .increment(0);
        }
    }
    for route in snapshot.router.routes() {
        let Some(retry) = &route.retry else { continue };
        let upstream = &route.upstream.name;
        metrics::counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "route" => label(&route.name), "upstream" => label(upstream))
            .increment(0);
        for reason in &retry.config.on {
            metrics::counter!(RETRIES_TOTAL, "route" => label(&route.name), "upstream" => label(upstream),
                "reason" => crate::retry::reason_label(*reason))
            .increment(0);
        }
    }
}

/// Sets every per-backend and per-upstream gauge from `snapshot`: health,
/// circuit state, in-flight, queue depth. Called every second and before each
/// scrape; gauges of backends no longer in the snapshot are not refreshed and
/// expire.
pub fn refresh_gauges(snapshot: &Snapshot) {
    let now = crate::clock::nanos_since_epoch();
    config_generation(snapshot.generation);
    for listener in &snapshot.config.listeners {
        // The listener task keeps the count; touching it keeps the series from
        // expiring while the listener is configured but quiet.
        gauge!(CONNECTIONS_OPEN, "listener" => listener.name.clone()).increment(0.0);
        for certificate in listener.tls.iter().flat_map(|tls| &tls.certificates) {
            gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "listener" => listener.name.clone(), "name" => certificate.label())
                .set(certificate.expires_at_unix_seconds() as f64);
        }
    }
    for upstream in &snapshot.upstreams {
        for backend in &upstream.backends {
            let labels = [("upstream", label(&upstream.name)), ("backend", label(&backend.address))];
            let healthy = if backend.is_healthy(now) { 1.0 } else { 0.0 };
            gauge!(BACKEND_HEALTHY, &labels).set(healthy);
            gauge!(IN_FLIGHT, &labels).set(f64::from(backend.in_flight()));
            let admin = backend.state.admin();
            for state in AdminState::ALL {
                let [upstream, backend] = labels.clone();
                gauge!(BACKEND_ADMIN_STATE, &[upstream, backend, ("state", state.as_str().into())])
                    .set(one_if(state == admin));
            }
            if backend.breaker.is_some() {
                let phase = backend.state.breaker.phase();
                for state in Phase::ALL {
                    let [upstream, backend] = labels.clone();
                    gauge!(CIRCUIT_STATE, &[upstream, backend, ("state", state.as_str().into())])
                        .set(one_if(state == phase));
                }
            }
        }
        if upstream.config.discovery.is_some() {
            // What the request path serves: the last good set, not the last answer.
            gauge!(DISCOVERED_BACKENDS, "upstream" => label(&upstream.name)).set(upstream.backends.len() as f64);
        }
        if let Some(queue) = &upstream.queue {
            gauge!(QUEUE_WAITING, "upstream" => label(&upstream.name)).set(queue.waiting() as f64);
        }
    }
}

/// Appends the families whose series live in the backends' state (see
/// `metrics::series`) for what `snapshot` holds: a backend or route that left
/// it has no series. Each family is written whole, after the exporter's. Then
/// the cluster link's, when there is one.
pub fn write_owned_series(snapshot: &Snapshot, out: &mut String) {
    // Always 1: the labels are the point (which build answers this scrape).
    Family::gauge(out, crate::metrics::BUILD_INFO)
        .value(&[("version", crate::version::VERSION), ("commit", crate::version::COMMIT)], 1);
    write_backend_series(snapshot, out);
    if let Some(cluster) = &snapshot.cluster {
        write_cluster_series(cluster, out);
    }
    write_process_series(out);
}

/// The process's own series, under the names every Prometheus client library
/// uses, read from the OS by `metrics-process` at each scrape. Written here
/// rather than through the exporter, whose counters are whole numbers: CPU
/// time would be counted in whole seconds.
fn write_process_series(out: &mut String) {
    let process = metrics_process::collector::collect();
    if let Some(seconds) = process.cpu_seconds_total {
        Family::counter(out, PROCESS_CPU_SECONDS_TOTAL).value(&[], seconds);
    }
    let gauges = [
        (PROCESS_RESIDENT_MEMORY_BYTES, process.resident_memory_bytes),
        (PROCESS_VIRTUAL_MEMORY_BYTES, process.virtual_memory_bytes),
        (PROCESS_OPEN_FDS, process.open_fds),
        // 0 stands for no limit.
        (PROCESS_MAX_FDS, process.max_fds.filter(|&limit| limit > 0)),
        (PROCESS_START_TIME_SECONDS, process.start_time_seconds),
        (PROCESS_THREADS, process.threads),
    ];
    for (name, value) in gauges {
        if let Some(value) = value {
            Family::gauge(out, name).value(&[], value);
        }
    }
}

fn write_cluster_series(cluster: &crate::cluster::Cluster, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = &cluster.stats;
    Family::gauge(out, CLUSTER_AVAILABLE).value(&[], u64::from(cluster.available()));
    Family::gauge(out, CLUSTER_SLOTS_HELD).value(&[], cluster.held_slots() as u64);
    Family::histogram(out, CLUSTER_REDIS_DURATION_SECONDS).histogram_value(&[], &stats.round_trips);
    let mut renewals = Family::counter(out, CLUSTER_LEASE_RENEWALS_TOTAL);
    renewals.value(&[("result", "success")], stats.renewals_ok.load(Relaxed));
    renewals.value(&[("result", "error")], stats.renewals_failed.load(Relaxed));
    drop(renewals);
    Family::counter(out, CLUSTER_FALLBACKS_TOTAL).value(&[], stats.fallbacks.load(Relaxed));
    Family::counter(out, CLUSTER_SLOTS_LOST_TOTAL).value(&[], stats.slots_lost.load(Relaxed));
}

fn write_backend_series(snapshot: &Snapshot, out: &mut String) {
    let mut requests = Family::counter(out, REQUESTS_TOTAL);
    for route in snapshot.router.routes() {
        let upstream = &*route.upstream.name;
        for (backend, counts) in route.upstream.backends.iter().zip(&route.requests) {
            requests.requests(&[("route", &route.name), ("upstream", upstream), ("backend", &backend.address)], counts);
        }
        requests.requests(
            &[("route", &route.name), ("upstream", upstream), ("backend", "-")],
            &route.requests_without_backend,
        );
    }
    requests.requests(&[("route", "-"), ("upstream", "-"), ("backend", "-")], &UNROUTED_REQUESTS);
    drop(requests);

    let mut durations = Family::histogram(out, UPSTREAM_DURATION_SECONDS);
    for upstream in &snapshot.upstreams {
        for backend in &upstream.backends {
            let labels = [("upstream", &*upstream.name), ("backend", &*backend.address)];
            durations.histogram_value(&labels, &backend.state.series.upstream_duration);
        }
    }
    drop(durations);

    // Ejections exist at 0 where passive health can eject; health checks
    // where an active check runs.
    let mut ejections = Family::counter(out, BACKEND_EJECTIONS_TOTAL);
    for upstream in snapshot.upstreams.iter().filter(|u| u.config.health.passive.is_some()) {
        for backend in &upstream.backends {
            let labels = [("upstream", &*upstream.name), ("backend", &*backend.address)];
            ejections.value(&labels, backend.state.series.ejections());
        }
    }
    drop(ejections);

    let mut checks = Family::counter(out, HEALTH_CHECKS_TOTAL);
    for upstream in snapshot.upstreams.iter().filter(|u| u.config.health.active.is_some()) {
        for backend in &upstream.backends {
            let (passed, failed) = backend.state.series.checks();
            for (result, count) in [("pass", passed), ("fail", failed)] {
                let labels = [("upstream", &*upstream.name), ("backend", &*backend.address), ("result", result)];
                checks.value(&labels, count);
            }
        }
    }
}
