//! A real Prometheus (Debian's `prometheus`, installed by
//! scripts/install-test-deps) scrapes a running Switchyard configured as the
//! Kubernetes example is: admin on its own port with a token from a file, and
//! `metrics_without_token`, so a scraper that holds no secret gets `/metrics`
//! while every other admin call still needs the token.

use http::Request;
use http_body_util::BodyExt;

use crate::support::*;

/// Prometheus's HTTP API answer to an instant query, or `None` while it
/// cannot answer yet.
async fn query(prometheus: &str, expression: &str) -> Option<serde_json::Value> {
    let encoded: String = expression
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!("http://{prometheus}/api/v1/query?query={encoded}");
    let request = Request::get(url).body(full("")).unwrap();
    let response = client().request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).ok()?;
    (answer["status"] == "success").then(|| answer["data"]["result"].clone())
}

/// The value of the one series `expression` gives, with its labels.
async fn one_series(prometheus: &str, expression: &str) -> Option<(serde_json::Value, String)> {
    let result = query(prometheus, expression).await?;
    let series = result.as_array()?.first()?;
    Some((series["metric"].clone(), series["value"][1].as_str()?.to_owned()))
}

/// The last scrape error of `job`'s target, from Prometheus's targets API.
async fn target_error(prometheus: &str, job: &str) -> Option<String> {
    let request = Request::get(format!("http://{prometheus}/api/v1/targets")).body(full("")).unwrap();
    let response = client().request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let targets = answer["data"]["activeTargets"].as_array()?;
    let target = targets.iter().find(|t| t["labels"]["job"] == job)?;
    Some(target["lastError"].as_str()?.to_owned())
}

/// `prometheus` with its own data directory, stopped when the test ends.
struct Prometheus {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(scrape_configs: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, format!("global: {{ scrape_interval: 1s, scrape_timeout: 1s }}\n{scrape_configs}"))
            .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/install-test-deps)");
        Prometheus { child, address, _dir: dir }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_metrics_without_the_token_and_nothing_else() {
    let bot = Backend::start("bot").await;
    let secrets = tempfile::tempdir().unwrap();
    let token = "a-token-prometheus-does-not-hold";
    std::fs::write(secrets.path().join("token"), format!("{token}\n")).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().yaml();
    let yaml = format!(
        "admin:\n  bind: \"{admin}\"\n  token_file: {}\n  metrics_without_token: true\n{yaml}",
        secrets.path().join("token").display()
    );
    let proxy = ProxyProcess::start(&yaml).await;
    for _ in 0..5 {
        assert_eq!(get(&client(), &proxy.url("/")).await.status, 200);
    }

    // The example's scrape (the prometheus.io annotations mean exactly this:
    // GET /metrics on the admin port, no credentials), and one of a page that
    // stays behind the token, which must fail.
    let prometheus = Prometheus::start(&format!(
        "scrape_configs:\n  - job_name: switchyard\n    static_configs: [{{ targets: [\"{admin}\"] }}]\n  \
         - job_name: status-without-token\n    metrics_path: /status\n    static_configs: [{{ targets: [\"{admin}\"] }}]\n"
    ));
    let server = &prometheus.address;
    wait_until_async("Prometheus to scrape Switchyard", || async {
        one_series(server, "up{job=\"switchyard\"}").await.is_some_and(|(_, value)| value == "1")
    })
    .await;
    let (labels, value) = one_series(server, "switchyard_build_info").await.expect("build info through Prometheus");
    assert_eq!(value, "1");
    assert_eq!(labels["version"], switchyard::version::VERSION);
    assert_eq!(labels["commit"], switchyard::version::COMMIT);
    wait_until_async("the proxy's request counts through Prometheus", || async {
        one_series(server, "sum(switchyard_requests_total{route!=\"-\"})").await.is_some_and(|(_, v)| v == "5")
    })
    .await;
    // Refused by the token, not merely unparsable: the target's last error
    // is the 401.
    wait_until_async("the scrape of /status to be refused", || async {
        target_error(server, "status-without-token").await.is_some_and(|error| error.contains("401"))
    })
    .await;
    let status = get(&client(), &format!("http://{admin}/status")).await;
    assert_eq!(status.status, 401, "the rest of the admin API keeps the token");
    let status =
        get_with(&client(), &format!("http://{admin}/status"), &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(status.status, 200);
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(
        (&status["version"], &status["commit"]),
        (&labels["version"], &labels["commit"]),
        "/status names the build"
    );
}
