//! Forwarding rules and the error table, end to end through real sockets.

use std::time::Duration;

use http::Request;
use hyper_util::client::legacy::Client;

use crate::support::*;

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let client = client();
    let request = Request::get(proxy.url("/path?q=1"))
        .header("host", "bots.example:8080")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("x-forwarded-for", "203.0.113.9")
        .header("proxy-authorization", "Basic abc")
        .header("x-custom", "kept")
        .body(full(""))
        .unwrap();
    let answer = send(&client, request).await;
    assert_eq!(answer.status, 200);
    let generated_id = answer.headers.get("x-request-id").expect("a request id is returned").clone();
    assert_eq!(generated_id.len(), 32);

    let seen = backend.stats.last_headers.lock().unwrap().clone().unwrap();
    // Not a trusted proxy (`trusted_proxies` is empty): its claim is replaced.
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "bots.example:8080");
    assert_eq!(seen["host"], "bots.example:8080");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-request-id"], generated_id);
    for hop in ["x-private", "proxy-authorization", "connection"] {
        assert!(!seen.contains_key(hop), "{hop} was forwarded");
    }

    // A client's own request id is passed through untouched.
    let answer = get_with(&client, &proxy.url("/"), &[("x-request-id", "client-id-1")]).await;
    assert_eq!(answer.headers["x-request-id"], "client-id-1");
    assert_eq!(backend.stats.last_headers.lock().unwrap().as_ref().unwrap()["x-request-id"], "client-id-1");
}

#[tokio::test]
async fn routes_match_on_host_path_method_and_headers_first_match_wins() {
    let [a, b, c, d, e] = [
        Backend::start("exact-host").await,
        Backend::start("suffix-host").await,
        Backend::start("post-jobs").await,
        Backend::start("tenant").await,
        Backend::start("fallback").await,
    ];
    let yaml = format!(
        r#"listeners: [{{ bind: "127.0.0.1:0" }}]
routes:
  - {{ match: {{ host: "bots.internal" }}, upstream: a }}
  - {{ match: {{ host: "*.bots.internal" }}, upstream: b }}
  - {{ match: {{ path_prefix: /jobs/, methods: [POST] }}, upstream: c }}
  - {{ match: {{ headers: {{ x-tenant: acme }} }}, upstream: d }}
  - {{ match: {{ path_prefix: /api/ }}, upstream: e }}
upstreams:
  a: {{ backends: [{{ address: "{}" }}] }}
  b: {{ backends: [{{ address: "{}" }}] }}
  c: {{ backends: [{{ address: "{}" }}] }}
  d: {{ backends: [{{ address: "{}" }}] }}
  e: {{ backends: [{{ address: "{}" }}] }}
"#,
        a.addr, b.addr, c.addr, d.addr, e.addr
    );
    let proxy = start_proxy(&yaml).await;
    let client = client();
    let url = |path: &str| proxy.url(path);
    assert_eq!(get_with(&client, &url("/x"), &[("host", "BOTS.internal:80")]).await.body, "exact-host");
    assert_eq!(get_with(&client, &url("/x"), &[("host", "eu.bots.internal")]).await.body, "suffix-host");
    let post = Request::post(url("/jobs/1")).body(full("job")).unwrap();
    assert_eq!(send(&client, post).await.body, "post-jobs");
    assert_eq!(get_with(&client, &url("/jobs/1"), &[("x-tenant", "acme")]).await.body, "tenant");
    assert_eq!(get(&client, &url("/api/v1")).await.body, "fallback");
    let miss = get_with(&client, &url("/other"), &[("x-tenant", "other")]).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.error_code(), Some("no_route"));
}

#[tokio::test]
async fn refused_connection_is_502_upstream_connect() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: gone }}]\nupstreams:\n  gone:\n    backends: [{{ address: \"{closed}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.error_code(), Some("upstream_connect"));
    assert!(!answer.body.contains('\n') || answer.body.trim_end().lines().count() == 1, "one line: {}", answer.body);
}

#[tokio::test]
async fn route_timeout_is_504_and_a_slow_backend_does_not_delay_other_routes() {
    let slow = Backend::start("slow").await;
    let fast = Backend::start("fast").await;
    let yaml = format!(
        r#"listeners: [{{ bind: "127.0.0.1:0" }}]
routes:
  - {{ match: {{ path_prefix: /slow }}, upstream: slow, timeout: 300ms }}
  - {{ match: {{ path_prefix: /hold }}, upstream: slow }}
  - {{ upstream: fast }}
upstreams:
  slow: {{ backends: [{{ address: "{}" }}] }}
  fast: {{ backends: [{{ address: "{}" }}] }}
"#,
        slow.addr, fast.addr
    );
    let proxy = start_proxy(&yaml).await;
    let client = client();
    let answer = get(&client, &proxy.url("/slow?delay_ms=5000")).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.error_code(), Some("upstream_timeout"));

    // While requests to the slow backend are stuck, the fast route keeps answering.
    let mut stuck = Vec::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), proxy.url("/hold"));
        stuck.push(tokio::spawn(async move { get(&client, &url).await }));
    }
    wait_until("stuck requests", Duration::from_secs(10), || slow.in_flight() >= 8).await;
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "fast");
    }
    assert!(stuck.iter().all(|s| !s.is_finished()), "the slow requests were still held");
    slow.release_held();
    for request in stuck {
        assert_eq!(request.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_same_port() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let answer = get(&h2c_client(), &proxy.url("/")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "a");
    assert_eq!(get(&client(), &proxy.url("/")).await.body, "a");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let backend = Backend::start("a").await;
    let yaml = PoolConfig::new(&[&backend]).balance("{ policy: round_robin }").limit("max_body_bytes", 1000).yaml();
    let proxy = start_proxy(&yaml).await;
    let client = client();
    // Declared too large: refused before any backend sees it.
    let declared = Request::post(proxy.url("/")).body(full(vec![b'x'; 5000])).unwrap();
    let answer = send(&client, declared).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.error_code(), Some("body_too_large"));
    assert_eq!(backend.hits(), 0);
    // Chunked, no length: cut off at the limit while streaming.
    let streamed = Request::post(proxy.url("/")).body(streaming_body(200_000)).unwrap();
    let answer = send(&crate::support::client(), streamed).await;
    assert_eq!(answer.status, 413);
    assert!(backend.stats.bytes_received.load(std::sync::atomic::Ordering::SeqCst) <= 1000);
    // Within the limit: fine.
    let small = Request::post(proxy.url("/")).body(full(vec![b'x'; 1000])).unwrap();
    assert_eq!(send(&client, small).await.status, 200);
}

#[tokio::test]
async fn backend_connections_are_kept_alive_and_reused_whatever_the_body() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    // One client connection, so every request is on one worker and its pool.
    let client = Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(1).build_http();
    for round in 0..20 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200, "round {round}");
        // Empty bodies, which the proxy may never poll: 204 and a HEAD.
        assert_eq!(get(&client, &proxy.url("/status?code=204")).await.status, 204);
        let head = send(&client, Request::head(proxy.url("/")).body(full("")).unwrap()).await;
        assert_eq!(head.status, 200);
        // A response the client reads to the end in pieces.
        assert_eq!(get(&client, &proxy.url("/download?bytes=300000")).await.body.len(), 300_000);
    }
    assert_eq!(backend.hits(), 80);
    assert_eq!(backend.stats.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one kept-alive connection");
}

/// Over HTTP/2 the request id goes out "never indexed": HPACK keeps a value
/// that is new on every response out of its table, where it would only
/// evict the entries later responses reuse. `nghttp` marks such headers
/// "sensitive" as it decodes them.
#[tokio::test]
async fn request_ids_are_never_indexed_over_http2() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let url = proxy.url("/");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nghttp")
            .args(["-nv", "-m", "3", &url])
            .output()
            .unwrap_or_else(|e| panic!("nghttp (scripts/install-test-deps installs it): {e}"))
    })
    .await
    .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let ids: Vec<&str> = text.lines().filter(|line| line.contains(") x-request-id: ")).collect();
    assert_eq!(ids.len(), 3, "{text}");
    assert!(ids.iter().all(|line| line.contains(", sensitive) x-request-id: ")), "{text}");
}
