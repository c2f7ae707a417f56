//! Day-two operations: taking one bot out through the admin API (drain,
//! disable, enable) while its job finishes, and keeping that through reloads.

use std::time::Duration;

use http::Request;
use serde_json::Value;

use crate::support::*;

async fn backend_action(proxy: &FileProxy, upstream: &str, address: &str, action: &str) -> Answer {
    let url = format!("http://{}/upstreams/{upstream}/backends/{address}/{action}", proxy.admin);
    send(&client(), Request::post(url).body(full("")).unwrap()).await
}

fn backend_status(status: &Value, address: &str) -> Value {
    backend_in_status(status, address).unwrap_or_else(|| panic!("no backend {address} in /status"))
}

/// The state `switchyard_backend_admin_state` says the backend is in: the
/// one of its series at 1 (and none when the series are missing, or not
/// exactly one is 1).
async fn admin_state_metric(proxy: &FileProxy, address: &str) -> Option<&'static str> {
    let scrape = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let mut current = None;
    for state in ["enabled", "draining", "disabled"] {
        let labels = [("upstream", "pool"), ("backend", address), ("state", state)];
        match metric_value(&scrape, "switchyard_backend_admin_state", &labels)? {
            1.0 if current.is_none() => current = Some(state),
            0.0 => {}
            _ => return None,
        }
    }
    current
}

/// Answers of `count` plain requests, by the backend that served them.
async fn served_by(proxy: &FileProxy, count: usize) -> Vec<String> {
    let client = client();
    let mut names = Vec::new();
    for _ in 0..count {
        let answer = get(&client, &proxy.url("/")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        names.push(answer.headers["x-backend"].to_str().unwrap().to_owned());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_bot_finishes_its_job_gets_no_new_one_and_keeps_the_override_through_a_reload() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let config = |route_timeout: &str| {
        PoolConfig::new(&[&a, &b]).balance("{ policy: round_robin }").route_timeout(route_timeout).yaml()
    };
    let proxy = FileProxy::start(&config("60s")).await;
    let (a_address, b_address) = (a.addr.to_string(), b.addr.to_string());

    // A job running on each bot.
    let mut jobs = Vec::new();
    while a.in_flight() == 0 || b.in_flight() == 0 {
        assert!(jobs.len() < 10, "round robin never reached both bots");
        let url = proxy.url("/hold");
        jobs.push(tokio::spawn(async move { get(&client(), &url).await }));
        wait_until("the job to start", Duration::from_secs(10), || a.in_flight() + b.in_flight() == jobs.len()).await;
    }

    let answer = backend_action(&proxy, "pool", &a_address, "drain").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!((body["admin_state"].as_str(), body["drained"].as_bool()), (Some("draining"), Some(false)));

    // No new request reaches it; its job is still running.
    let hits = a.hits();
    assert!(served_by(&proxy, 20).await.iter().all(|name| name == "b"));
    assert_eq!(a.hits(), hits);
    assert_eq!(a.in_flight(), 1);
    let status = proxy.status().await;
    let drained = backend_status(&status, &a_address);
    assert_eq!(drained["admin_state"], "draining");
    assert_eq!(drained["drained"], false);
    assert!(drained["why"].as_str().unwrap().contains("draining (admin)"), "{drained}");
    let explain = get(&client(), &format!("http://{}/explain?path=/", proxy.admin)).await.body;
    assert!(explain.contains("draining (admin)"), "{explain}");
    assert_eq!(admin_state_metric(&proxy, &a_address).await, Some("draining"));

    // A reload that keeps the bot keeps the override.
    proxy.replace_config(&config("90s"));
    proxy.wait_for_generation(2).await;
    assert_eq!(backend_status(&proxy.status().await, &a_address)["admin_state"], "draining");
    assert!(served_by(&proxy, 10).await.iter().all(|name| name == "b"));

    // The running jobs finish normally, and the bot reports drained.
    a.release_held();
    b.release_held();
    for job in jobs {
        assert_eq!(job.await.unwrap().status, 200);
    }
    // The proxy counts a job done when it has sent the response's last
    // byte, which the client may read a moment before that count is made.
    wait_until_async("the bot to report drained", || async {
        backend_status(&proxy.status().await, &a_address)["drained"] == true
    })
    .await;
    let status = proxy.status().await;
    assert_eq!(backend_status(&status, &a_address)["drained"], true);
    assert!(backend_status(&status, &a_address)["why"].as_str().unwrap().starts_with("drained"));

    // Enabled: it takes requests again.
    assert_eq!(backend_action(&proxy, "pool", &a_address, "enable").await.status, 200);
    let names = served_by(&proxy, 10).await;
    assert!(names.iter().any(|name| name == "a") && names.iter().any(|name| name == "b"), "{names:?}");
    assert_eq!(admin_state_metric(&proxy, &a_address).await, Some("enabled"));

    // Disabled: out at once.
    assert_eq!(backend_action(&proxy, "pool", &b_address, "disable").await.status, 200);
    assert!(served_by(&proxy, 10).await.iter().all(|name| name == "a"));
    assert_eq!(backend_status(&proxy.status().await, &b_address)["why"], "disabled (admin)");
    assert_eq!(admin_state_metric(&proxy, &b_address).await, Some("disabled"));
    assert_eq!(backend_action(&proxy, "pool", &a_address, "disable").await.status, 200);
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!((answer.status.as_u16(), answer.error_code()), (503, Some("no_healthy_backend")));

    // A bot removed from the config and added back starts afresh: the override
    // lasts only while it stays.
    proxy.replace_config(&simple_config("{ policy: round_robin }", &[&a], ""));
    proxy.wait_for_generation(3).await;
    proxy.replace_config(&simple_config("{ policy: round_robin }", &[&a, &b], ""));
    proxy.wait_for_generation(4).await;
    assert_eq!(backend_status(&proxy.status().await, &b_address)["admin_state"], "enabled");
    assert_eq!(backend_status(&proxy.status().await, &a_address)["admin_state"], "disabled");
}

#[tokio::test]
async fn backend_actions_name_what_they_act_on_and_need_the_token() {
    let a = Backend::start("a").await;
    let token = "an-admin-token-for-actions-0123";
    let proxy = proxy_with_token(&a, token).await;
    let address = a.addr.to_string();
    let post = |path: String, token: Option<&'static str>| {
        let mut request = Request::post(format!("http://{}{path}", proxy.admin));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        send_owned(request.body(full("")).unwrap())
    };
    assert_eq!(post(format!("/upstreams/pool/backends/{address}/drain"), None).await.status, 401);
    assert_eq!(backend_status(&status_with(&proxy, token).await, &address)["admin_state"], "enabled");
    let bearer = Some("an-admin-token-for-actions-0123");
    assert_eq!(post(format!("/upstreams/pool/backends/{address}/drain"), bearer).await.status, 200);
    assert_eq!(post(format!("/upstreams/nope/backends/{address}/drain"), bearer).await.status, 404);
    assert_eq!(post("/upstreams/pool/backends/10.9.9.9:1/drain".to_owned(), bearer).await.status, 404);
    assert_eq!(post(format!("/upstreams/pool/backends/{address}/pause"), bearer).await.status, 404);
    // An address may be written percent-encoded (an IPv6 address's brackets).
    let encoded = address.replace(':', "%3A");
    assert_eq!(post(format!("/upstreams/pool/backends/{encoded}/enable"), bearer).await.status, 200);
    let get = send(
        &client(),
        Request::get(format!("http://{}/upstreams/pool/backends/{address}/drain", proxy.admin))
            .header("authorization", format!("Bearer {token}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 405);
    assert_eq!(backend_status(&status_with(&proxy, token).await, &address)["admin_state"], "enabled");
}

/// A proxy in front of `backend` whose admin API needs `token`.
async fn proxy_with_token(backend: &Backend, token: &str) -> FileProxy {
    let yaml = simple_config("{}", &[backend], "");
    FileProxy::start(&format!("admin: {{ bind: \"127.0.0.1:0\", token: \"{token}\" }}\n{yaml}")).await
}

async fn send_owned(request: Request<TestBody>) -> Answer {
    send(&client(), request).await
}

async fn status_with(proxy: &FileProxy, token: &str) -> Value {
    let request = Request::get(format!("http://{}/status", proxy.admin))
        .header("authorization", format!("Bearer {token}"))
        .body(full(""))
        .unwrap();
    serde_json::from_str(&send(&client(), request).await.body).unwrap()
}

/// Loads `url` in headless Chromium and returns the DOM once its scripts have
/// run (`--virtual-time-budget` lets the page's fetches and timers complete
/// before the dump), at a phone's window size.
fn browser_dom(url: &str) -> String {
    // The `chromium` on PATH: what scripts/install-test-deps looks for and installs.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let chromium = std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .expect("Chromium is installed by scripts/install-test-deps (Debian package `chromium`)");
    let profile = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=390,844",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("Chromium runs");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The `data-state` of the page's row for `address`.
fn row_state(dom: &str, address: &str) -> Option<String> {
    let row = &dom[dom.find(&format!("data-backend=\"{address}\""))?..];
    let row = &row[..row.find('>')?];
    let state = &row[row.find("data-state=\"")? + "data-state=\"".len()..];
    Some(state[..state.find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_killed_bot_as_down_in_a_real_browser() {
    let (up, doomed, drained) = (Backend::start("up").await, Backend::start("doomed").await, Backend::start("d").await);
    let yaml = PoolConfig::new(&[&up, &doomed, &drained])
        .balance("{ policy: round_robin }")
        .backend_fields(", max_concurrency: 4")
        // Checks with room to spare: the browser's start loads both cores, and a
        // healthy bot's check must not time out under it. The killed bot's
        // refused connection fails its check at once all the same.
        .health("{ active: { path: /healthz, interval: 1s, timeout: 1s, healthy_after: 1, unhealthy_after: 1 } }")
        .yaml();
    let proxy = FileProxy::start(&yaml).await;
    for _ in 0..6 {
        assert_eq!(get(&client(), &proxy.url("/")).await.status, 200);
    }
    assert_eq!(backend_action(&proxy, "pool", &drained.addr.to_string(), "drain").await.status, 200);
    doomed.kill();
    let doomed_address = doomed.addr.to_string();
    wait_until_async("the killed bot to be marked down", || async {
        backend_status(&proxy.status().await, &doomed_address)["healthy"] == false
    })
    .await;

    let page = get(&client(), &format!("http://{}/", proxy.admin)).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.body.contains("name=\"viewport\""), "made for phones too");
    for external in ["src=\"http", "href=\"http", "@import", "url("] {
        assert!(!page.body.contains(external), "the page loads nothing from elsewhere ({external})");
    }
    // No inline script may run (the script is a file of its own), nothing
    // may frame the page, and nothing it serves is sniffed into another type.
    let policy = page.headers["content-security-policy"].to_str().unwrap().to_owned();
    let script_src = policy.split(';').map(str::trim).find(|d| d.starts_with("script-src")).unwrap();
    assert_eq!(script_src, "script-src 'self'", "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(!page.body.contains("<script>"), "no inline script");
    let script = get(&client(), &format!("http://{}/page.js", proxy.admin)).await;
    assert_eq!(script.status, 200);
    for answer in [&page, &script] {
        assert_eq!(answer.headers["x-content-type-options"], "nosniff");
    }

    let url = format!("http://{}/", proxy.admin);
    let dom = tokio::task::spawn_blocking(move || browser_dom(&url)).await.unwrap();
    assert_eq!(row_state(&dom, &doomed_address).as_deref(), Some("down"), "the killed bot:\n{dom}");
    assert_eq!(row_state(&dom, &up.addr.to_string()).as_deref(), Some("up"));
    assert_eq!(row_state(&dom, &drained.addr.to_string()).as_deref(), Some("drained"));
    assert!(dom.contains("2 not up"), "the summary counts them");
    assert!(dom.contains("connection refused"), "the check's reason is shown");
    assert!(dom.contains("/ 4"), "in flight against max_concurrency");
}

#[tokio::test]
async fn with_a_token_the_status_page_takes_it_as_a_basic_password() {
    use base64::Engine as _;
    let a = Backend::start("a").await;
    let token = "a-token-for-the-page-0123456789";
    let proxy = proxy_with_token(&a, token).await;
    let admin_get = |path: &'static str, authorization: Option<String>| {
        let mut request = Request::get(format!("http://{}{path}", proxy.admin));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        send_owned(request.body(full("")).unwrap())
    };
    let refused = admin_get("/", None).await;
    assert_eq!(refused.status, 401);
    let challenge = refused.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("Basic realm="), "a browser asks for the token: {challenge}");
    let basic = |password: &str| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("ops:{password}")))
    };
    assert_eq!(admin_get("/", Some(basic(token))).await.status, 200);
    assert_eq!(admin_get("/status", Some(basic(token))).await.status, 200);
    assert_eq!(admin_get("/status", Some(basic("wrong-token-wrong-token"))).await.status, 401);
    assert_eq!(admin_get("/status", Some("Basic !!!".to_owned())).await.status, 401);
}

/// A request as a browser sends it when a page of `origin` posts a form.
async fn posted_from(proxy: &FileProxy, path: &str, origin: &str, site: &str) -> Answer {
    let request = Request::post(format!("http://{}{path}", proxy.admin))
        .header("origin", origin)
        .header("sec-fetch-site", site)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full(""))
        .unwrap();
    send(&client(), request).await
}

#[tokio::test]
async fn another_sites_page_cannot_act_on_the_admin_api_and_a_rebinding_name_cannot_read_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = FileProxy::start(&simple_config("{ policy: round_robin }", &[&a, &b], "")).await;
    let address = a.addr.to_string();
    let disable = format!("/upstreams/pool/backends/{address}/disable");

    // A form post from another site's page: refused, and nothing changes.
    for (origin, site) in [("https://evil.example", "cross-site"), ("http://evil.example", ""), ("null", "cross-site")]
    {
        let answer = posted_from(&proxy, &disable, origin, site).await;
        assert_eq!(answer.status, 403, "{origin} {site}: {}", answer.body);
    }
    let sibling = posted_from(&proxy, &disable, &format!("http://{}", proxy.admin), "same-site").await;
    assert_eq!(sibling.status, 403, "a sibling site's page is another site's too");
    assert_eq!(backend_status(&proxy.status().await, &address)["admin_state"], "enabled");

    // The status page's own origin, and tools that send neither header, act.
    let own = posted_from(&proxy, &disable, &format!("http://{}", proxy.admin), "same-origin").await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(backend_action(&proxy, "pool", &address, "enable").await.status, 200);

    // A rebinding page reaches the loopback admin under its own name: refused.
    let status = format!("http://{}/status", proxy.admin);
    let rebound =
        get_with(&client(), &status, &[("host", &format!("rebind.evil.example:{}", proxy.admin.port()))]).await;
    assert_eq!(rebound.status, 403);
    assert!(!rebound.body.contains(&address), "{}", rebound.body);
    let local = get_with(&client(), &status, &[("host", &format!("localhost:{}", proxy.admin.port()))]).await;
    assert_eq!(local.status, 200);
}
