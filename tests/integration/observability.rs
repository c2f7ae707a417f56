//! Observability: metrics that count exactly what was sent (parsed with a real
//! Prometheus text parser), the dashboard's metric names, `/status` and
//! `/explain` in words, admin tokens, `/config` redaction and access logs.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use serde_json::Value;

use crate::support::*;

fn closed_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_traffic_sent() {
    let [ok1, ok2, failing, good, bot, checked] = [
        Backend::start("ok1").await,
        Backend::start("ok2").await,
        Backend::start("failing").await,
        Backend::start("good").await,
        Backend::start("bot").await,
        Backend::start("checked").await,
    ];
    failing.stats.fail_with.store(500, Ordering::SeqCst);
    let (dead, refusing, ejectable) = (closed_port(), closed_port(), closed_port());
    let admin_port = free_port();
    let yaml = format!(
        r#"admin: {{ bind: "127.0.0.1:{admin_port}" }}
listeners: [{{ name: main, bind: "127.0.0.1:{{port}}" }}]
routes:
  - {{ name: ok, match: {{ path_prefix: /ok }}, upstream: good-pool }}
  - {{ name: fail, match: {{ path_prefix: /fail }}, upstream: failing }}
  - {{ name: dead, match: {{ path_prefix: /dead }}, upstream: dead }}
  - name: retry
    match: {{ path_prefix: /retry }}
    upstream: half-dead
    retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 1ms }} }}
  - name: stingy
    match: {{ path_prefix: /stingy }}
    upstream: dead
    retry: {{ attempts: 2, budget: {{ ratio: 0, min_per_second: 0 }} }}
  - {{ name: queue, match: {{ path_prefix: /queue }}, upstream: one-bot }}
  - {{ name: eject, match: {{ path_prefix: /eject }}, upstream: ejecting }}
  - {{ name: checked, match: {{ path_prefix: /checked }}, upstream: checked }}
upstreams:
  good-pool: {{ backends: [{{ address: "{ok1}" }}, {{ address: "{ok2}" }}] }}
  failing: {{ backends: [{{ address: "{failing}" }}] }}
  dead: {{ backends: [{{ address: "{dead}" }}] }}
  half-dead: {{ backends: [{{ address: "{refusing}" }}, {{ address: "{good}" }}] }}
  one-bot:
    backends: [{{ address: "{bot}", max_concurrency: 1 }}]
    queue: {{ max_waiting: 1, timeout: 30s }}
  ejecting:
    backends: [{{ address: "{ejectable}" }}, {{ address: "{good}" }}]
    health: {{ passive: {{ consecutive_failures: 1, ejection_time: 60s, max_ejection_percent: 50 }} }}
    circuit_breaker: {{ consecutive_failures: 100 }}
  checked:
    backends: [{{ address: "{checked}" }}]
    health: {{ active: {{ path: /healthz, interval: 100ms, timeout: 80ms }} }}
"#,
        ok1 = ok1.addr,
        ok2 = ok2.addr,
        failing = failing.addr,
        good = good.addr,
        bot = bot.addr,
        checked = checked.addr,
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = client();
    let url = |path: &str| proxy.url(path);
    let mut ok_bytes_answered = 0;
    for _ in 0..10 {
        let answer = get(&client, &url("/ok")).await;
        assert_eq!(answer.status, 200);
        ok_bytes_answered += answer.body.len();
    }
    // Bodies of 1,000 bytes, one each way: the byte counters' reference.
    let mut fail_bytes_answered = 0;
    for _ in 0..4 {
        let post = Request::post(url("/fail")).body(full(vec![b'x'; 1000])).unwrap();
        let answer = send(&client, post).await;
        assert_eq!(answer.status, 500);
        fail_bytes_answered += answer.body.len();
    }
    for _ in 0..3 {
        assert_eq!(get(&client, &url("/dead")).await.error_code(), Some("upstream_connect"));
    }
    for _ in 0..5 {
        // Round robin starts every request on the refusing backend; the retry succeeds.
        assert_eq!(get(&client, &url("/retry")).await.body, "good");
    }
    for _ in 0..2 {
        assert_eq!(get(&client, &url("/stingy")).await.error_code(), Some("upstream_connect"));
    }
    for _ in 0..2 {
        assert_eq!(get(&client, &url("/nowhere")).await.status, 404);
    }
    // Queue: one job runs, one waits, three are turned away.
    let running = tokio::spawn({
        let (client, url) = (client.clone(), url("/queue/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the bot to be busy", Duration::from_secs(10), || bot.in_flight() == 1).await;
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), url("/queue/next"));
        async move { get(&client, &url).await }
    });
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    wait_until_async("one request queued", || async {
        metric_value(&scrape(&metrics_url).await, "switchyard_queue_waiting", &[("upstream", "one-bot")]) == Some(1.0)
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get(&client, &url("/queue/more")).await.error_code(), Some("queue_full"));
    }
    bot.release_held();
    assert_eq!(running.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    // Passive ejection: the first request fails and ejects; the rest go to `good`.
    for _ in 0..4 {
        get(&client, &url("/eject")).await;
    }
    // A reload.
    let reload =
        send(&client, Request::post(format!("http://127.0.0.1:{admin_port}/reload")).body(full("")).unwrap()).await;
    assert_eq!(reload.status, 200);
    wait_until_async("health checks", || async {
        metric_value(&scrape(&metrics_url).await, "switchyard_health_checks_total", &[("result", "pass")]).is_some()
    })
    .await;

    let scrape = scrape(&metrics_url).await;
    let requests = |route: &str, upstream: &str, backend: &str, code: &str| {
        metric_value(
            &scrape,
            "switchyard_requests_total",
            &[("route", route), ("upstream", upstream), ("backend", backend), ("code", code)],
        )
    };
    let failing_stats = std::sync::Arc::clone(&failing.stats);
    let (ok1, ok2, failing, good, bot) = (
        ok1.addr.to_string(),
        ok2.addr.to_string(),
        failing.addr.to_string(),
        good.addr.to_string(),
        bot.addr.to_string(),
    );
    assert_eq!(requests("ok", "good-pool", &ok1, "200"), Some(5.0));
    assert_eq!(requests("ok", "good-pool", &ok2, "200"), Some(5.0));
    assert_eq!(requests("fail", "failing", &failing, "500"), Some(4.0));
    assert_eq!(requests("dead", "dead", &dead.to_string(), "502"), Some(3.0));
    assert_eq!(requests("retry", "half-dead", &good, "200"), Some(5.0));
    assert_eq!(requests("stingy", "dead", &dead.to_string(), "502"), Some(2.0));
    assert_eq!(requests("-", "-", "-", "404"), Some(2.0));
    assert_eq!(requests("queue", "one-bot", &bot, "200"), Some(2.0));
    assert_eq!(requests("queue", "one-bot", "-", "503"), Some(3.0));
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&scrape, name, labels);
    assert_eq!(
        value(
            "switchyard_retries_total",
            &[("route", "retry"), ("upstream", "half-dead"), ("reason", "connect-failure")]
        ),
        Some(5.0)
    );
    assert_eq!(value("switchyard_retry_budget_exhausted_total", &[("route", "stingy")]), Some(2.0));
    assert_eq!(value("switchyard_queue_rejected_total", &[("upstream", "one-bot"), ("reason", "full")]), Some(3.0));
    assert_eq!(
        value("switchyard_backend_ejections_total", &[("upstream", "ejecting"), ("backend", &ejectable.to_string())]),
        Some(1.0)
    );
    assert_eq!(value("switchyard_config_reloads_total", &[("result", "success")]), Some(1.0));
    assert_eq!(value("switchyard_config_generation", &[]), Some(2.0));
    assert_eq!(
        value("switchyard_request_duration_seconds_count", &[("route", "ok"), ("upstream", "good-pool")]),
        Some(10.0)
    );
    assert_eq!(
        value("switchyard_upstream_duration_seconds_count", &[("upstream", "good-pool"), ("backend", &ok1)]),
        Some(5.0)
    );
    assert_eq!(value("switchyard_in_flight", &[("upstream", "good-pool"), ("backend", &ok1)]), Some(0.0));
    let ok_route = [("route", "ok"), ("upstream", "good-pool")];
    let fail_route = [("route", "fail"), ("upstream", "failing")];
    assert_eq!(value("switchyard_request_body_bytes_total", &ok_route), Some(0.0), "GETs carry no body");
    assert_eq!(value("switchyard_response_body_bytes_total", &ok_route), Some(ok_bytes_answered as f64));
    let failing_received = failing_stats.bytes_received.load(Ordering::SeqCst);
    assert_eq!(failing_received, 4000, "the backend got every body");
    assert_eq!(value("switchyard_request_body_bytes_total", &fail_route), Some(failing_received as f64));
    assert_eq!(value("switchyard_response_body_bytes_total", &fail_route), Some(fail_bytes_answered as f64));
    // An enumeration is a series per state: 1 for the one it is in.
    let circuit = |state| value("switchyard_circuit_state", &[("backend", &good), ("state", state)]);
    assert_eq!((circuit("closed"), circuit("open"), circuit("half-open")), (Some(1.0), Some(0.0), Some(0.0)));
    let admin = |state| value("switchyard_backend_admin_state", &[("backend", &good), ("state", state)]);
    assert_eq!((admin("enabled"), admin("draining"), admin("disabled")), (Some(1.0), Some(0.0), Some(0.0)));
    // The process's own series, as every Prometheus client exports them.
    let resident = value("process_resident_memory_bytes", &[]).expect("resident memory");
    assert!(resident > 1e6, "a running proxy holds more than a megabyte: {resident}");
    assert!(value("process_open_fds", &[]).is_some_and(|fds| fds >= 3.0));
    assert!(value("process_cpu_seconds_total", &[]).is_some_and(|cpu| cpu > 0.0));
    assert_promtool_accepts(&metrics_url).await;
    assert!(value("switchyard_connections_open", &[("listener", "main")]).is_some());

    // Every name exported from the first scrape is, and the dashboard's
    // names of that set too (the others need TLS, discovery or a cluster).
    let exported: BTreeSet<String> = scrape.samples.iter().map(|s| base_name(&s.metric)).collect();
    for name in switchyard::metrics::ALL {
        assert!(exported.contains(name), "{name} is not exported; exported: {exported:?}");
    }
    for name in dashboard_metric_names().into_iter().filter(|name| switchyard::metrics::ALL.contains(&name.as_str())) {
        assert!(exported.contains(&name), "the dashboard uses {name}, which the proxy does not export");
    }
}

/// Every dashboard query is scoped to the instances picked in its
/// `instance` variable.
#[test]
fn every_dashboard_query_follows_the_instance_variable() {
    for expr in dashboard_queries() {
        let selectors = expr.matches("switchyard_").count() + expr.matches("process_").count();
        assert_eq!(expr.matches("instance=~\"$instance\"").count(), selectors, "{expr}");
    }
}

fn base_name(metric: &str) -> String {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| metric.strip_suffix(suffix))
        .filter(|base| base.ends_with("_seconds"))
        .unwrap_or(metric)
        .to_owned()
}

/// Every query of deploy/grafana/switchyard.json.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/switchyard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels with queries");
    exprs
}

fn dashboard_metric_names() -> BTreeSet<String> {
    let exprs = dashboard_queries();
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(start) = ["switchyard_", "process_"].iter().filter_map(|prefix| rest.find(prefix)).min() {
            let tail = &rest[start..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(base_name(&tail[..end]));
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

/// Every query is valid PromQL, by Prometheus's own parser: `promtool check
/// rules` on a rule file holding each one, with Grafana's variables given
/// values as Grafana would.
#[test]
fn every_dashboard_query_parses_as_promql() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("dashboard.rules.yml");
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_queries().iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*");
        file.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    std::fs::write(&rules, file).unwrap();
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool is installed (scripts/install-test-deps)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_dashboard_uses_only_contract_metric_names() {
    let names = dashboard_metric_names();
    for name in &names {
        assert!(
            switchyard::metrics::CONTRACT.iter().any(|(known, _, _)| known == name),
            "{name} is not a contract metric"
        );
    }
    for wanted in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_backend_healthy",
        "switchyard_circuit_state",
        "switchyard_queue_waiting",
        "switchyard_retries_total",
        "switchyard_config_reloads_total",
        "switchyard_backend_admin_state",
        "switchyard_discovery_lookups_total",
        "switchyard_tls_handshakes_total",
        "switchyard_certificate_expiry_timestamp_seconds",
        "switchyard_cluster_slots_held",
        "switchyard_response_body_bytes_total",
        "process_cpu_seconds_total",
    ] {
        assert!(names.contains(wanted), "the dashboard shows {wanted}");
    }
}

async fn admin_get(admin: std::net::SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let mut request = Request::get(format!("http://{admin}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    send(&client(), request.body(full("")).unwrap()).await
}

#[tokio::test]
async fn status_and_explain_say_why_a_backend_gets_no_traffic() {
    let [sick, ejected, tripped, busy, fine] = [
        Backend::start("sick").await,
        Backend::start("ejected").await,
        Backend::start("tripped").await,
        Backend::start("busy").await,
        Backend::start("fine").await,
    ];
    sick.stats.health_status.store(503, Ordering::SeqCst);
    let yaml = format!(
        r#"listeners: [{{ bind: "127.0.0.1:0" }}]
routes:
  - {{ name: health, match: {{ path_prefix: /health }}, upstream: health }}
  - {{ name: passive, match: {{ path_prefix: /passive }}, upstream: passive }}
  - {{ name: breaker, match: {{ path_prefix: /breaker }}, upstream: breaker }}
  - {{ name: jobs, match: {{ path_prefix: /jobs }}, upstream: jobs }}
upstreams:
  health:
    health: {{ active: {{ path: /healthz, interval: 100ms, timeout: 80ms, unhealthy_after: 1 }} }}
    backends: [{{ address: "{sick}" }}, {{ address: "{fine}" }}]
  passive:
    health: {{ passive: {{ consecutive_failures: 1, ejection_time: 60s, max_ejection_percent: 50 }} }}
    backends: [{{ address: "{ejected_addr}" }}, {{ address: "{fine}" }}]
  breaker:
    circuit_breaker: {{ consecutive_failures: 1, open_for: 60s }}
    backends: [{{ address: "{tripped_addr}" }}, {{ address: "{fine}" }}]
  jobs:
    balance: {{ policy: consistent_hash, key: "header:x-job-id" }}
    backends: [{{ address: "{busy}", max_concurrency: 1 }}, {{ address: "{fine}" }}, {{ address: "{sick}" }}]
"#,
        sick = sick.addr,
        fine = fine.addr,
        busy = busy.addr,
        ejected_addr = ejected.addr,
        tripped_addr = tripped.addr,
    );
    ejected.stats.fail_with.store(500, Ordering::SeqCst);
    tripped.stats.fail_with.store(500, Ordering::SeqCst);
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    let client = client();
    get(&client, &proxy.url("/passive")).await;
    get(&client, &proxy.url("/breaker")).await;
    let explain = |query: String| {
        let client = client.clone();
        async move {
            serde_json::from_str::<Value>(&get(&client, &format!("http://{admin}/explain?{query}")).await.body).unwrap()
        }
    };
    // Find a key that /explain says goes to `busy`, and hold a job there.
    let mut holder = None;
    for i in 0..200 {
        let key = format!("holder-{i}");
        if explain(format!("path=/jobs/x&header=x-job-id:{key}")).await["backend"] == busy.addr.to_string().as_str() {
            holder = Some(key);
            break;
        }
    }
    let holder = holder.expect("some key maps to busy");
    let held = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/jobs/hold"));
        async move { get_with(&client, &url, &[("x-job-id", &holder)]).await }
    });
    wait_until("busy to hold a job", Duration::from_secs(10), || busy.in_flight() == 1).await;
    wait_until_async("sick to be marked down", || async {
        let status: Value = serde_json::from_str(&admin_get(admin, "/status", None).await.body).unwrap();
        status.to_string().contains("unhealthy: active check failing (status 503)")
    })
    .await;
    let status: Value = serde_json::from_str(&admin_get(admin, "/status", None).await.body).unwrap();
    let why = |upstream: &str, backend: &Backend| -> String {
        let upstream = status["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == upstream).unwrap();
        let entry = upstream["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == backend.addr.to_string().as_str())
            .unwrap();
        assert_eq!(entry["eligible"], false, "{entry}");
        entry["why"].as_str().unwrap().to_owned()
    };
    assert!(why("health", &sick).starts_with("unhealthy: active check failing (status 503)"));
    assert!(why("passive", &ejected).starts_with("ejected for"));
    assert!(why("breaker", &tripped).starts_with("circuit open for"));
    assert_eq!(why("jobs", &busy), "at max_concurrency (1/1 in flight)");

    // /explain names the backend that real requests with a key reach.
    for key in ["job-1", "job-2", "job-3", "job-4", "job-5", "job-6"] {
        let answer = explain(format!("path=/jobs/x&header=x-job-id:{key}")).await;
        assert_eq!(answer["route"], "jobs");
        assert_eq!(answer["policy"], "consistent_hash");
        let named = answer["backend"].as_str().map(str::to_owned);
        let real = get_with(&client, &proxy.url("/jobs/x"), &[("x-job-id", key)]).await;
        let reached = [&busy, &fine, &sick].into_iter().find(|b| b.name == real.body).map(|b| b.addr.to_string());
        assert_eq!(named, reached, "explain for {key}: {answer:#}");
        let candidates = answer["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 3);
        assert!(candidates.iter().any(|c| c["why"] == "at max_concurrency (1/1 in flight)"), "{answer:#}");
        assert_ne!(named.as_deref(), Some(busy.addr.to_string().as_str()), "a full backend is never named");
    }
    let nowhere = explain("path=/elsewhere".into()).await;
    assert_eq!(nowhere["route"], Value::Null);
    busy.release_held();
    assert_eq!(held.await.unwrap().status, 200);
}

#[tokio::test]
async fn an_admin_token_is_required_and_never_shown() {
    let backend = Backend::start("a").await;
    let token = "s3cret-admin-token-0123456789";
    let yaml = PoolConfig::new(&[&backend])
        .balance("{ policy: round_robin }")
        .admin(&format!("{{ bind: \"127.0.0.1:0\", token: \"{token}\" }}"))
        .log("{ access: true }")
        .yaml();
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    // Liveness and readiness probes answer without it: a kubelet cannot hold a secret.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(admin_get(admin, path, None).await.status, 200, "{path} without a token");
        assert_eq!(admin_get(admin, path, Some(token)).await.status, 200, "{path} with the token");
    }
    assert_eq!(admin_get(admin, "/healthz/../status", None).await.status, 401, "only the probe paths are open");
    for path in ["/status", "/metrics", "/config", "/explain?path=/"] {
        assert_eq!(admin_get(admin, path, None).await.status, 401, "{path} without a token");
        assert_eq!(
            admin_get(admin, path, Some("wrong-token-wrong-token")).await.status,
            401,
            "{path} with a wrong token"
        );
        let answer = admin_get(admin, path, Some(token)).await;
        assert_eq!(answer.status, 200, "{path} with the token");
        assert!(!answer.body.contains(token), "{path} shows the token");
    }
    let config = admin_get(admin, "/config", Some(token)).await.body;
    assert!(config.contains("<redacted>") && config.contains("round_robin"), "{config}");

    // A bad token in a config file is reported without repeating it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        PoolConfig::new(&[&backend]).admin("{ bind: \"0.0.0.0:9901\", token: \"short secret\" }").yaml(),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("admin token must be") && !stderr.contains("short secret"), "{stderr}");
    std::fs::write(&path, PoolConfig::new(&[&backend]).admin("{ bind: \"0.0.0.0:9901\" }").yaml()).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("so `token` (or `token_file`) is required"));
}

#[tokio::test]
async fn the_admin_token_can_come_from_a_file() {
    // As a Kubernetes Secret mounts it: a file beside (or below) the config, with a final newline.
    let backend = Backend::start("a").await;
    let token = "token-from-a-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin-token"), format!("{token}\n")).unwrap();
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(
        &path,
        PoolConfig::new(&[&backend]).admin("{ bind: \"127.0.0.1:0\", token_file: admin-token }").yaml(),
    )
    .unwrap();
    let proxy = switchyard::app::RunningProxy::start_from_file(&path).await.expect("proxy starts");
    let admin = proxy.admin_addr().await;
    assert_eq!(admin_get(admin, "/status", None).await.status, 401);
    assert_eq!(admin_get(admin, "/status", Some(token)).await.status, 200);

    // A missing file is a config error at its line and column, and says which file.
    std::fs::remove_file(dir.path().join("admin-token")).unwrap();
    assert_check_reports(&path, "missing token_file", 1, 43, "cannot read admin token_file");
}

#[tokio::test]
async fn access_log_lines_carry_every_field_and_never_the_token() {
    let backend = Backend::start("a").await;
    let admin_port = free_port();
    let token = "another-admin-token-0123456789";
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(
        &path,
        format!(
            "admin: {{ bind: \"127.0.0.1:{admin_port}\", token: \"{token}\" }}\nlog: {{ access: true, format: json }}\ntracing: {{ otlp_endpoint: \"http://{}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{port}\" }}]\nroutes: [{{ name: web, upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
            closed_port(),
            backend.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("proxy.log");
    let proxy = LoggingProxy::start(&path, &log);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until_async("the proxy to listen", || async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = get_with(
        &client(),
        &format!("http://{addr}/jobs/7?secret=no"),
        &[("x-request-id", "req-42"), ("traceparent", traceparent)],
    )
    .await;
    assert_eq!(answer.status, 200);
    admin_get(format!("127.0.0.1:{admin_port}").parse().unwrap(), "/status", Some(token)).await;
    let line = wait_for_log_line(&log, "req-42").await;
    drop(proxy);
    let entry: Value = serde_json::from_str(&line).expect("a JSON log line");
    let fields = &entry["fields"];
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["path"], "/jobs/7");
    assert_eq!(fields["route"], "web");
    assert_eq!(fields["upstream"], "pool");
    assert_eq!(fields["backend"], backend.addr.to_string());
    assert_eq!(fields["status"], "200");
    assert_eq!(fields["attempts"], 1);
    assert_eq!(fields["request_id"], "req-42");
    assert_eq!(fields["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the trace the request belongs to");
    assert!(fields["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(fields["duration_ms"].is_number() && fields["queue_wait_ms"].is_number());
    assert!(entry["timestamp"].is_string());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(token), "the token appeared in the log");
}

#[tokio::test]
async fn a_removed_backends_series_leave_metrics_after_a_reload() {
    let [kept, removed] = [Backend::start("kept").await, Backend::start("removed").await];
    let admin_port = free_port();
    // Every kind of per-backend series: gauges, request counters, the try
    // histogram, ejections (passive health) and health checks (active).
    let config = |backends: &[&Backend], route: &str| {
        let list: String = backends.iter().map(|b| format!("{{ address: \"{}\" }}, ", b.addr)).collect();
        format!(
            "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nroutes: [{{ name: {route}, upstream: pool }}]\nupstreams:\n  pool:\n    health:\n      active: {{ path: /healthz, interval: 100ms, timeout: 100ms }}\n      passive: {{ consecutive_failures: 3 }}\n    backends: [{}]\n",
            list.trim_end_matches(", ")
        )
    };
    let proxy = ProxyProcess::start(&config(&[&kept, &removed], "jobs")).await;
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let client = client();
    for _ in 0..4 {
        assert_eq!(get(&client, &proxy.url("/job")).await.status, 200);
    }
    assert!(kept.hits() > 0 && removed.hits() > 0, "both backends served requests");
    let series_of = |scrape: &prometheus_parse::Scrape, backend: &Backend| -> std::collections::BTreeSet<String> {
        let address = backend.addr.to_string();
        scrape.samples.iter().filter(|s| s.labels.get("backend") == Some(&address)).map(|s| s.metric.clone()).collect()
    };
    let every_kind = [
        "switchyard_in_flight",
        "switchyard_backend_healthy",
        "switchyard_requests_total",
        "switchyard_upstream_duration_seconds_count",
        "switchyard_backend_ejections_total",
        "switchyard_health_checks_total",
    ];
    wait_until_async("both backends' health checks to be counted", || async {
        let scrape = scrape(&metrics_url).await;
        [&kept, &removed].iter().all(|b| {
            let address = b.addr.to_string();
            metric_value(&scrape, "switchyard_health_checks_total", &[("backend", &address), ("result", "pass")])
                .is_some_and(|passed| passed > 0.0)
        })
    })
    .await;
    let before = scrape(&metrics_url).await;
    for backend in [&kept, &removed] {
        let series = series_of(&before, backend);
        for name in every_kind {
            assert!(series.contains(name), "{name} of {} before the reload: {series:?}", backend.addr);
        }
    }
    let kept_requests = |scrape: &prometheus_parse::Scrape, route: &str| {
        metric_value(
            scrape,
            "switchyard_requests_total",
            &[("route", route), ("backend", &kept.addr.to_string()), ("code", "200")],
        )
    };
    let served_by_kept = kept_requests(&before, "jobs").expect("the kept backend's requests");

    let port = proxy.addr.port().to_string();
    std::fs::write(&proxy.path, config(&[&kept], "jobs").replace("{port}", &port)).unwrap();
    wait_until_async("the removed backend's series to leave", || async {
        series_of(&scrape(&metrics_url).await, &removed).is_empty()
    })
    .await;
    // Longer than a gauge's idle expiry: the kept backend, quiet all along,
    // keeps every series, and its counts carry over the reload.
    tokio::time::sleep(switchyard::metrics::GAUGE_IDLE + std::time::Duration::from_millis(1500)).await;
    let after = scrape(&metrics_url).await;
    assert!(series_of(&after, &removed).is_empty(), "{:?}", series_of(&after, &removed));
    let series = series_of(&after, &kept);
    for name in every_kind {
        assert!(series.contains(name), "{name} of the kept backend after the reload: {series:?}");
    }
    assert_eq!(kept_requests(&after, "jobs"), Some(served_by_kept), "the kept backend's count carried over");

    // A route that is renamed leaves its series too.
    std::fs::write(&proxy.path, config(&[&kept], "renamed").replace("{port}", &port)).unwrap();
    wait_until_async("the renamed route to serve", || async {
        get(&client, &proxy.url("/job")).await.status == 200
            && kept_requests(&scrape(&metrics_url).await, "renamed").is_some()
    })
    .await;
    let renamed = scrape(&metrics_url).await;
    assert_eq!(kept_requests(&renamed, "jobs"), None, "the old route's requests left");
}

#[tokio::test]
async fn configured_series_exist_from_startup_at_zero_and_stay_while_quiet() {
    let backend = Backend::start("a").await;
    // A process of its own: counters are process-wide, and other tests reload.
    let admin_port = free_port();
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ name: main, bind: \"127.0.0.1:{{port}}\" }}]\nroutes:\n  - name: jobs\n    upstream: bots\n    retry: {{ on: [connect-failure, timeout] }}\nupstreams:\n  bots:\n    backends: [{{ address: \"{}\", max_concurrency: 1 }}]\n    queue: {{ max_waiting: 5, timeout: 1s }}\n    health: {{ passive: {{ consecutive_failures: 3 }} }}\n",
        backend.addr
    );
    let _proxy = ProxyProcess::start(&yaml).await;
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let address = backend.addr.to_string();
    let expected: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("switchyard_config_reloads_total", vec![("result", "success")]),
        ("switchyard_config_reloads_total", vec![("result", "error")]),
        ("switchyard_connections_open", vec![("listener", "main")]),
        ("switchyard_retries_total", vec![("route", "jobs"), ("upstream", "bots"), ("reason", "connect-failure")]),
        ("switchyard_retries_total", vec![("route", "jobs"), ("upstream", "bots"), ("reason", "timeout")]),
        ("switchyard_retry_budget_exhausted_total", vec![("route", "jobs"), ("upstream", "bots")]),
        ("switchyard_queue_rejected_total", vec![("upstream", "bots"), ("reason", "full")]),
        ("switchyard_queue_rejected_total", vec![("upstream", "bots"), ("reason", "timeout")]),
        ("switchyard_backend_ejections_total", vec![("upstream", "bots"), ("backend", &address)]),
        ("switchyard_queue_waiting", vec![("upstream", "bots")]),
        ("switchyard_in_flight", vec![("upstream", "bots"), ("backend", &address)]),
    ];
    // The readiness probe's connection may still be open on the proxy's side
    // (it sees the probe's close a moment later): the one legitimate non-zero.
    wait_until_async("the readiness probe's connection to close", || async {
        metric_value(&scrape(&metrics_url).await, "switchyard_connections_open", &[("listener", "main")]) == Some(0.0)
    })
    .await;
    // Before any traffic, and again after longer than a gauge's idle expiry
    // with no traffic at all: every series is there, at zero.
    for moment in ["at startup", "after a quiet spell"] {
        let scrape = scrape(&metrics_url).await;
        for (name, labels) in &expected {
            assert_eq!(metric_value(&scrape, name, labels), Some(0.0), "{name}{labels:?} {moment}");
        }
        if moment == "at startup" {
            tokio::time::sleep(switchyard::metrics::GAUGE_IDLE + std::time::Duration::from_millis(1500)).await;
        }
    }
}

#[tokio::test]
async fn gauges_follow_what_the_backends_see() {
    let held = Backend::start("held").await;
    let failing = Backend::start("failing").await;
    failing.stats.fail_with.store(500, std::sync::atomic::Ordering::SeqCst);
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - {{ match: {{ path_prefix: /fail }}, upstream: failing }}\n  - {{ upstream: held }}\nupstreams:\n  held:\n    backends: [{{ address: \"{}\" }}]\n  failing:\n    backends: [{{ address: \"{}\" }}]\n    circuit_breaker: {{ consecutive_failures: 1, open_for: 60s }}\n",
        held.addr, failing.addr
    );
    let proxy = start_proxy(&yaml).await;
    let metrics_url = format!("http://{}/metrics", proxy.running.admin_addr().await);
    let client = client();
    let holding = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held request", std::time::Duration::from_secs(10), || held.in_flight() == 1).await;
    assert_eq!(get(&client, &proxy.url("/fail")).await.status, 500);
    let scrape = scrape(&metrics_url).await;
    let (held_address, failing_address) = (held.addr.to_string(), failing.addr.to_string());
    let in_flight = metric_value(&scrape, "switchyard_in_flight", &[("backend", &held_address)]);
    assert_eq!(in_flight, Some(1.0), "one request in flight on the held backend");
    let circuit =
        |state| metric_value(&scrape, "switchyard_circuit_state", &[("backend", &failing_address), ("state", state)]);
    assert_eq!((circuit("open"), circuit("closed")), (Some(1.0), Some(0.0)), "the failing backend's circuit is open");
    held.release_held();
    assert_eq!(holding.await.unwrap().status, 200);
    // The client can have the whole body a moment before the proxy, having
    // written it, finds the body's end and frees the slot.
    wait_until_async("the held backend's slot to be free", || async {
        metric_value(&self::scrape(&metrics_url).await, "switchyard_in_flight", &[("backend", &held_address)])
            == Some(0.0)
    })
    .await;
}
