//! Health: active checks, passive ejection, slow start, measured with real
//! backends that die, hang, fail and come back.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn backend_list(backends: &[&Backend]) -> String {
    backends.iter().map(|b| format!("      - {{ address: \"{}\" }}\n", b.addr)).collect()
}

fn health_config(backends: &[&Backend], balance: &str, health: &str) -> String {
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {balance}\n    health:\n{health}    backends:\n{}",
        backend_list(backends)
    )
}

async fn admin_status(admin: std::net::SocketAddr) -> Value {
    serde_json::from_str(&get(&client(), &format!("http://{admin}/status")).await.body).unwrap()
}

fn backend_status<'a>(status: &'a Value, backend: &Backend) -> &'a Value {
    let address = backend.addr.to_string();
    status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["backends"].as_array().unwrap())
        .find(|b| b["address"] == address.as_str())
        .unwrap_or_else(|| panic!("{address} not in /status"))
}

async fn wait_for_health(admin: std::net::SocketAddr, backend: &Backend, healthy: bool) {
    wait_until_async(&format!("{} healthy={healthy}", backend.name), || async {
        backend_status(&admin_status(admin).await, backend)["healthy"] == healthy
    })
    .await;
}

/// One request's result: when it finished, and who answered or failed.
struct Seen {
    at: Instant,
    ok: bool,
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_dropped_within_the_check_window_and_ramps_back_in_with_slow_start() {
    let backends = [Backend::start("b0").await, Backend::start("b1").await, Backend::start("b2").await];
    let interval = Duration::from_millis(200);
    let unhealthy_after = 2;
    let health = "      active: { kind: http, path: /healthz, interval: 200ms, timeout: 150ms, healthy_after: 2, unhealthy_after: 2 }\n      slow_start: 3s\n";
    let all: Vec<&Backend> = backends.iter().collect();
    let proxy = start_proxy(&health_config(&all, "{ policy: round_robin }", health)).await;
    let admin = proxy.running.admin_addr().await;

    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (seen, stop, url) = (Arc::clone(&seen), Arc::clone(&stop), proxy.url("/"));
        load.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                let answer = get(&client, &url).await;
                seen.lock().unwrap().push(Seen { at: Instant::now(), ok: answer.status == 200, body: answer.body });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Kill b1 under load.
    let killed_at = Instant::now();
    backends[1].kill();
    wait_for_health(admin, &backends[1], false).await;
    let detected = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let errors: Vec<(Duration, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.ok)
        .map(|s| (s.at.saturating_duration_since(killed_at), s.body.clone()))
        .collect();
    // Error bodies name no backend: the request counters say whose they were.
    let scrape = scrape(&format!("http://{admin}/metrics")).await;
    let failed_at = |backend: &Backend| -> f64 {
        let address = backend.addr.to_string();
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "switchyard_requests_total" && s.labels.get("backend") == Some(&address))
            .filter(|s| s.labels.get("code") != Some("200"))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => panic!("a counter"),
            })
            .sum()
    };
    assert!(failed_at(&backends[1]) >= errors.len() as f64, "{} errors, not all from the dead backend", errors.len());
    assert_eq!(failed_at(&backends[0]) + failed_at(&backends[2]), 0.0, "an error came from a live backend");
    let last_error = errors.iter().map(|(at, _)| *at).max().unwrap_or_default();
    let window = interval * unhealthy_after + interval;
    eprintln!(
        "killed b1: marked unhealthy after {detected:?}, {} errors (all from b1), last at {last_error:?}; window {window:?}",
        errors.len()
    );
    // The window plus scheduling slack for a loaded 2-core machine.
    assert!(last_error <= window + Duration::from_secs(2), "requests reached the dead backend for {last_error:?}");

    // Bring it back: healthy after two passing checks, then its share ramps up.
    let restarted = backends[1].restart().await;
    wait_for_health(admin, &restarted, true).await;
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let mut shares = Vec::new();
    for second in 0..4 {
        let (from, to) = (back_at + Duration::from_secs(second), back_at + Duration::from_secs(second + 1));
        let window: Vec<&Seen> = seen.iter().filter(|s| s.at >= from && s.at < to).collect();
        assert!(window.iter().all(|s| s.ok), "no errors after recovery");
        let share = window.iter().filter(|s| s.body == "b1").count() as f64 / window.len().max(1) as f64;
        shares.push(share);
    }
    eprintln!("b1 share per second after recovery (slow_start 3s): {shares:.3?}");
    assert!(shares[0] < 0.2, "first second share {:.3} should be small", shares[0]);
    assert!(shares[0] < shares[2], "share ramps up: {shares:?}");
    assert!(shares[3] > 0.25, "full share after the window: {shares:?}");
}

#[tokio::test]
async fn a_backend_that_accepts_but_never_answers_is_caught_by_the_check_timeout() {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let held_sockets = Arc::new(Mutex::new(Vec::new()));
    let keeper = Arc::clone(&held_sockets);
    tokio::spawn(async move {
        while let Ok((socket, _)) = hung.accept().await {
            keeper.lock().unwrap().push(socket);
        }
    });
    let good = Backend::start("good").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool, timeout: 30s }}]\nupstreams:\n  pool:\n    health:\n      active: {{ path: /healthz, interval: 300ms, timeout: 200ms, unhealthy_after: 2 }}\n    backends:\n      - {{ address: \"{hung_addr}\" }}\n      - {{ address: \"{}\" }}\n",
        good.addr
    );
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    wait_until_async("the hung backend to be marked unhealthy", || async {
        let status = admin_status(admin).await;
        let hung = status["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == hung_addr.to_string().as_str())
            .unwrap()
            .clone();
        hung["healthy"] == false
    })
    .await;
    let status = admin_status(admin).await;
    let hung_status = status["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == hung_addr.to_string().as_str())
        .unwrap();
    assert_eq!(hung_status["active_check"]["last_reason"], "timeout after 200ms");
    // Now no request waits on the hung backend.
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "good");
    }
}

#[tokio::test]
async fn a_backend_answering_503_is_ejected_passively_without_active_checks() {
    let [bad, good] = [Backend::start("bad").await, Backend::start("good").await];
    bad.stats.fail_with.store(503, Ordering::SeqCst);
    let health = "      passive: { consecutive_failures: 3, ejection_time: 30s, max_ejection_percent: 50 }\n";
    let proxy = start_proxy(&health_config(&[&bad, &good], "{ policy: round_robin }", health)).await;
    let admin = proxy.running.admin_addr().await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(&client, &proxy.url("/")).await.status.as_u16());
    }
    assert_eq!(bad.hits(), 3, "ejected after exactly 3 consecutive failures");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 3, "{statuses:?}");
    assert!(statuses[6..].iter().all(|s| *s == 200));
    let status = admin_status(admin).await;
    let bad_status = backend_status(&status, &bad);
    assert_eq!(bad_status["healthy"], false);
    let ejected_for = bad_status["ejected_for_seconds"].as_f64().unwrap();
    assert!(ejected_for > 25.0 && ejected_for <= 30.0, "{ejected_for}");
}

#[tokio::test]
async fn max_ejection_percent_50_with_3_of_4_failing_ejects_at_most_2() {
    let backends =
        [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await, Backend::start("ok").await];
    for failing in &backends[..3] {
        failing.stats.fail_with.store(500, Ordering::SeqCst);
    }
    let health = "      passive: { consecutive_failures: 2, ejection_time: 60s, max_ejection_percent: 50 }\n";
    let all: Vec<&Backend> = backends.iter().collect();
    let proxy = start_proxy(&health_config(&all, "{ policy: round_robin }", health)).await;
    let admin = proxy.running.admin_addr().await;
    let client = client();
    for _ in 0..60 {
        get(&client, &proxy.url("/")).await;
    }
    let status = admin_status(admin).await;
    let ejected: Vec<&Value> = status["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ejected_for_seconds"].is_number())
        .collect();
    assert_eq!(ejected.len(), 2, "exactly the cap of 2 of 4 is ejected: {status:#}");
    assert!(ejected.iter().all(|b| b["address"] != backends[3].addr.to_string().as_str()));
}

#[tokio::test]
async fn the_grpc_check_follows_serving_and_not_serving() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: grpc }}]\nupstreams:\n  grpc:\n    protocol: h2c\n    health:\n      active: {{ kind: grpc, service: bots.Runner, interval: 150ms, timeout: 100ms, healthy_after: 1, unhealthy_after: 1 }}\n    backends: [{{ address: \"{addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    let health_of = || async { admin_status(admin).await["upstreams"][0]["backends"][0].clone() };
    wait_until_async("first check", || async { health_of().await["active_check"]["last_reason"] == "SERVING" }).await;

    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::NotServing).await;
    wait_until_async("NOT_SERVING to be noticed", || async { health_of().await["healthy"] == false }).await;
    assert_eq!(health_of().await["active_check"]["last_reason"], "NOT_SERVING");
    let answer = get(&h2c_client(), &proxy.url("/grpc.health.v1.Health/Check")).await;
    assert_eq!((answer.status.as_u16(), answer.error_code()), (503, Some("no_healthy_backend")));

    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::Serving).await;
    wait_until_async("SERVING again", || async { health_of().await["healthy"] == true }).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr)).unwrap().connect().await.unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = client.check(tonic_health::pb::HealthCheckRequest { service: "bots.Runner".into() }).await.unwrap();
    assert_eq!(reply.into_inner().status, 1);
}

#[tokio::test]
async fn health_state_survives_a_reload_and_checkers_are_shared_not_duplicated() {
    let [sick, well] = [Backend::start("sick").await, Backend::start("well").await];
    sick.stats.health_status.store(503, Ordering::SeqCst);
    let check = "{ path: /healthz, interval: 100ms, timeout: 80ms, healthy_after: 2, unhealthy_after: 2 }";
    let config = |extra_upstream: bool, policy: &str| {
        let list = backend_list(&[&sick, &well]);
        let second = if extra_upstream {
            format!("  also:\n    health:\n      active: {check}\n    backends:\n{list}")
        } else {
            String::new()
        };
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {{ policy: {policy} }}\n    health:\n      active: {check}\n    backends:\n{list}{second}"
        )
    };
    let proxy = FileProxy::start(&config(true, "round_robin")).await;
    wait_for_health(proxy.admin, &sick, false).await;
    let status = proxy.status().await;
    assert_eq!(
        status["health_checkers"], 2,
        "two upstreams list the same two backends with the same check: one checker each"
    );

    // Reload with another policy and one upstream fewer: no re-learning.
    proxy.replace_config(&config(false, "random"));
    proxy.wait_for_generation(2).await;
    let status = proxy.status().await;
    assert_eq!(status["health_checkers"], 2);
    let sick_status = backend_status(&status, &sick);
    assert_eq!(sick_status["healthy"], false, "still unhealthy right after the reload");
    assert!(sick_status["active_check"]["consecutive_failures"].as_u64().unwrap() >= 2, "the failure streak was kept");
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "well");
    }
    assert_eq!(sick.hits(), 0);

    // A check that changes restarts its checkers; without checks, none run.
    proxy.replace_config(&config(false, "random").edit("path: /healthz", "path: /healthz?v=2"));
    proxy.wait_for_generation(3).await;
    assert_eq!(proxy.status().await["health_checkers"], 2);
    let unchecked = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends:\n{}",
        backend_list(&[&sick, &well])
    );
    proxy.replace_config(&unchecked);
    proxy.wait_for_generation(4).await;
    assert_eq!(proxy.status().await["health_checkers"], 0);
    let checks_then = sick.stats.health_checks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sick.stats.health_checks.load(Ordering::SeqCst), checks_then, "stopped checkers send no more checks");
}

#[tokio::test]
async fn ejection_survives_a_reload() {
    let [bad, good] = [Backend::start("bad").await, Backend::start("good").await];
    bad.stats.fail_with.store(502, Ordering::SeqCst);
    let health = "      passive: { consecutive_failures: 2, ejection_time: 60s, max_ejection_percent: 50 }\n";
    let proxy = FileProxy::start(&health_config(&[&bad, &good], "{ policy: round_robin }", health)).await;
    let client = client();
    for _ in 0..10 {
        get(&client, &proxy.url("/")).await;
    }
    assert_eq!(bad.hits(), 2);
    proxy.replace_config(&health_config(&[&bad, &good], "{ policy: least_loaded }", health));
    proxy.wait_for_generation(2).await;
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "good");
    }
    assert_eq!(bad.hits(), 2, "still ejected after the reload");
}

#[tokio::test]
async fn health_metrics_are_exported() {
    let [bad, good] = [Backend::start("bad").await, Backend::start("good").await];
    bad.stats.fail_with.store(500, Ordering::SeqCst);
    bad.stats.health_status.store(500, Ordering::SeqCst);
    let admin_port = free_port();
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    health:\n      active: {{ path: /healthz, interval: 100ms, timeout: 80ms, unhealthy_after: 3 }}\n      passive: {{ consecutive_failures: 1, ejection_time: 60s, max_ejection_percent: 50 }}\n    backends:\n{}",
        backend_list(&[&bad, &good])
    );
    let proxy = ProxyProcess::start(&yaml).await;
    // One failed request ejects `bad` before its checks mark it down.
    let client = client();
    for _ in 0..4 {
        get(&client, &proxy.url("/")).await;
    }
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let (bad_label, good_label) = (bad.addr.to_string(), good.addr.to_string());
    wait_until_async("health gauges and check counters", || async {
        let scrape = scrape(&metrics_url).await;
        let gauge = |backend: &str| {
            metric_value(&scrape, "switchyard_backend_healthy", &[("upstream", "pool"), ("backend", backend)])
        };
        let checks = |backend: &str, result: &str| {
            metric_value(
                &scrape,
                "switchyard_health_checks_total",
                &[("upstream", "pool"), ("backend", backend), ("result", result)],
            )
        };
        gauge(&bad_label) == Some(0.0)
            && gauge(&good_label) == Some(1.0)
            && checks(&bad_label, "fail").is_some_and(|n| n >= 3.0)
            && checks(&good_label, "pass").is_some_and(|n| n >= 1.0)
    })
    .await;
    let scrape = scrape(&metrics_url).await;
    assert_eq!(
        metric_value(&scrape, "switchyard_backend_ejections_total", &[("upstream", "pool"), ("backend", &bad_label)]),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_tcp_check_notices_a_closed_port() {
    let [gone, stays] = [Backend::start("gone").await, Backend::start("stays").await];
    let health = "      active: { kind: tcp, interval: 100ms, timeout: 80ms, healthy_after: 1, unhealthy_after: 1 }\n";
    let proxy = start_proxy(&health_config(&[&gone, &stays], "{ policy: round_robin }", health)).await;
    let admin = proxy.running.admin_addr().await;
    wait_until_async("a passing tcp check", || async {
        backend_status(&admin_status(admin).await, &gone)["active_check"]["last_reason"] == "connected"
    })
    .await;
    gone.kill();
    wait_for_health(admin, &gone, false).await;
    assert_eq!(backend_status(&admin_status(admin).await, &gone)["active_check"]["last_reason"], "connection refused");
    let client = client();
    for _ in 0..6 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "stays");
    }
}
