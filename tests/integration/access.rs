//! Access control at the edge, address lists: `allow` / `deny` of routes and
//! listeners, on the client's address as the proxy establishes it (the
//! peer, or what a trusted proxy in front says), from real sockets bound to
//! other loopback addresses; refusals are 403 `forbidden`, never reach a
//! backend, are counted and explained, and follow a reload.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// One HTTP/1.1 request to `proxy` from a socket bound to `source`, with
/// `headers`; the status and the `x-switchyard-error` of the answer.
async fn get_from(source: &str, proxy: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: bots.test\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    let code =
        answer.lines().find_map(|line| line.strip_prefix("x-switchyard-error: ")).map(|code| code.trim().to_owned());
    (status, code)
}

fn config(backend: SocketAddr, route_rules: &str, extra: &str) -> String {
    format!(
        "{extra}listeners:\n  - {{ name: main, bind: \"127.0.0.1:0\" }}\nroutes:\n  - {{ name: jobs, match: {{ path_prefix: /jobs }}, upstream: bots{route_rules} }}\n  - {{ name: open, upstream: bots }}\nupstreams:\n  bots: {{ backends: [{{ address: \"{backend}\" }}] }}\n"
    )
}

#[tokio::test]
async fn a_routes_address_lists_decide_on_the_peer_and_a_refusal_never_reaches_the_backend() {
    let backend = Backend::start("bot").await;
    let rules = ", allow: [\"127.0.0.0/24\"], deny: [\"127.0.0.66\"]";
    let proxy = FileProxy::start(&config(backend.addr, rules, "")).await;
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/1", &[]).await, (200, None));
    assert_eq!(get_from("127.0.0.66", proxy.addr, "/jobs/2", &[]).await, (403, Some("forbidden".into())), "denied");
    let outside = get_from("127.0.1.5", proxy.addr, "/jobs/3", &[]).await;
    assert_eq!(outside, (403, Some("forbidden".into())), "in no block of allow");
    // Another route has no rules.
    assert_eq!(get_from("127.0.1.5", proxy.addr, "/other", &[]).await, (200, None));
    // What a client says of itself counts for nothing without trusted proxies.
    let claimed = get_from("127.0.1.5", proxy.addr, "/jobs/4", &[("x-forwarded-for", "127.0.0.9")]).await;
    assert_eq!(claimed.0, 403);
    assert_eq!(backend.hits(), 2, "refused requests never reach the backend");
    // HTTP/2 requests pass the same rules.
    let over_h2 = get(&h2c_client(), &proxy.url("/jobs/h2")).await;
    assert_eq!((over_h2.status.as_u16(), backend.hits()), (200, 3), "from 127.0.0.1, in allow");
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some("127.0.0.66".parse().unwrap()));
    let denied_h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let refused = get(&denied_h2, &proxy.url("/jobs/h2")).await;
    assert_eq!((refused.status.as_u16(), refused.error_code()), (403, Some("forbidden")), "from 127.0.0.66, in deny");
    assert_eq!(backend.hits(), 3);

    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let denied = metric_value(&metrics, "switchyard_access_denied_total", &[("route", "jobs"), ("reason", "address")]);
    assert_eq!(denied, Some(4.0));
    let requests = metric_value(&metrics, "switchyard_requests_total", &[("route", "jobs"), ("code", "403")]);
    assert_eq!(requests, Some(4.0));

    // `/explain` says which rule decides.
    let explain = |source: &'static str| {
        let admin = proxy.admin;
        async move {
            let answer = get(&client(), &format!("http://{admin}/explain?path=/jobs/9&client_ip={source}")).await;
            serde_json::from_str::<Value>(&answer.body).unwrap()
        }
    };
    let refused = explain("127.0.0.66").await;
    assert_eq!(refused["decision"], "client 127.0.0.66 may not use the route: in deny 127.0.0.66/32: 403 forbidden");
    let allowed = explain("127.0.0.7").await;
    assert_eq!(allowed["access"], "client 127.0.0.7 may use the route");
    assert!(allowed["decision"].as_str().unwrap().starts_with("would go to"), "{allowed}");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_client_it_names_is_the_one_checked() {
    let backend = Backend::start("bot").await;
    let rules = ", allow: [\"10.0.0.0/8\"]";
    // Route names of its own: counters are process-wide in this test binary.
    let yaml = config(backend.addr, rules, "trusted_proxies: [\"127.0.0.1\"]\n").replace("name: jobs", "name: behind");
    let proxy = FileProxy::start(&yaml).await;
    let forwarded = |client: &'static str| [("x-forwarded-for", client)];
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/1", &forwarded("10.1.2.3")).await.0, 200);
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/2", &forwarded("192.168.1.1")).await.0, 403);
    // The trusted proxy itself, naming no one, is the client: not in allow.
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/3", &[]).await.0, 403);
    // From a peer that is not trusted, its header is not believed.
    assert_eq!(get_from("127.0.0.2", proxy.addr, "/jobs/4", &forwarded("10.1.2.3")).await.0, 403);
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn a_forwarding_header_that_cannot_be_read_does_not_make_the_trusted_proxy_the_client() {
    let backend = Backend::start("bot").await;
    // The balancer's own network may use the route; clients behind it may not.
    let rules = ", allow: [\"127.0.0.0/8\"]";
    let yaml = config(backend.addr, rules, "trusted_proxies: [\"127.0.0.1\"]\n").replace("name: jobs", "name: unread");
    let proxy = FileProxy::start(&yaml).await;
    // A client's bytes that are not text, then the address its balancer appended.
    let appended = get_from("127.0.0.1", proxy.addr, "/jobs/1", &[("x-forwarded-for", "\u{80}, 192.168.1.1")]).await;
    assert_eq!(appended.0, 403, "the appended client is read past the bytes before it");
    // A chain with no address before the trusted hop: the client is unknown, refused.
    let garbage = get_from("127.0.0.1", proxy.addr, "/jobs/2", &[("x-forwarded-for", "not-an-address")]).await;
    assert_eq!(garbage.0, 403);
    // A chain that names a client in allow passes.
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/3", &[("x-forwarded-for", "127.0.0.44")]).await.0, 200);
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn a_listeners_deny_refuses_every_request_and_a_reload_lifts_it() {
    let backend = Backend::start("bot").await;
    let deny = config(backend.addr, "", "")
        .replace("bind: \"127.0.0.1:0\" }", "bind: \"127.0.0.1:0\", deny: [\"127.0.0.0/8\"] }");
    let proxy = FileProxy::start(&deny).await;
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/open", &[]).await, (403, Some("forbidden".into())));
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/jobs/1", &[]).await.0, 403);
    assert_eq!(backend.hits(), 0);
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let counted = metric_value(&metrics, "switchyard_access_denied_total", &[("route", "-"), ("reason", "address")]);
    assert_eq!(counted, Some(2.0));

    // A reload that renames the listener keeps its socket, and its rules.
    proxy.replace_config(&deny.replace("name: main", "name: edge"));
    proxy.wait_for_generation(2).await;
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/open", &[]).await.0, 403, "the renamed listener's deny");
    proxy.replace_config(&config(backend.addr, "", ""));
    proxy.wait_for_generation(3).await;
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/open", &[]).await, (200, None));
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn an_address_list_entry_that_is_not_an_address_is_a_config_error_at_its_place() {
    let text = "listeners: [{ bind: \"127.0.0.1:0\" }]\nroutes:\n  - { upstream: a, deny: [\"10.0.0.0/8\", \"ten\"] }\nupstreams:\n  a: { backends: [{ address: \"x:1\" }] }\n";
    let error = switchyard::config::parse(text, "bad.yaml").unwrap_err().0.remove(0);
    assert_eq!((error.line, error.column), (3, 41), "{}", error.message);
    assert!(error.message.contains("deny entry `ten` is not a CIDR block"), "{}", error.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_its_rate_under_load_and_its_429s_say_when_to_come_back() {
    let backend = Backend::start("bot").await;
    let yaml = format!(
        "listeners: [{{ name: main, bind: \"127.0.0.1:0\" }}]\nroutes:\n  - {{ name: jobs, match: {{ path_prefix: /jobs }}, upstream: bots, rate_limit: {{ requests: 100, per: 1s, burst: 10 }} }}\n  - {{ name: keyed, upstream: bots, rate_limit: {{ requests: 1, per: 1m, burst: 1, key: \"header:x-api-key\" }} }}\nupstreams:\n  bots: {{ backends: [{{ address: \"{}\" }}] }}\n",
        backend.addr
    );
    let proxy = FileProxy::start(&yaml).await;
    // Eight clients as fast as they can for two seconds: far over 100 a second.
    let started = tokio::time::Instant::now();
    let until = started + std::time::Duration::from_secs(2);
    let loads: Vec<_> = (0..8)
        .map(|_| {
            let url = proxy.url("/jobs/run");
            tokio::spawn(async move {
                let client = client();
                let (mut served, mut limited, mut last_429) = (0u32, 0u32, None);
                while tokio::time::Instant::now() < until {
                    let answer = get(&client, &url).await;
                    match answer.status.as_u16() {
                        200 => served += 1,
                        429 => {
                            limited += 1;
                            last_429 = Some(answer);
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                (served, limited, last_429)
            })
        })
        .collect();
    let (mut served, mut limited, mut a_429) = (0, 0, None);
    for load in loads {
        let (s, l, last) = load.await.unwrap();
        served += s;
        limited += l;
        a_429 = a_429.or(last);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A burst of 10, then 100 a second.
    let expected = 10.0 + 100.0 * elapsed;
    let off = (f64::from(served) - expected).abs() / expected;
    assert!(off <= 0.05, "{served} served in {elapsed:.3}s where {expected:.0} were due ({limited} limited)");
    assert!(limited > served, "the load was over the limit: {limited} limited");
    assert_eq!(backend.hits() as u32, served, "a limited request never reaches the backend");
    let a_429 = a_429.expect("some requests were limited");
    assert_eq!(a_429.error_code(), Some("rate_limited"));
    assert_eq!(a_429.headers["retry-after"], "1");
    assert_eq!(a_429.headers["ratelimit-policy"], "\"route\";q=100;w=1");
    assert_eq!(a_429.headers["ratelimit"], "\"route\";r=0;t=1");
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let counted =
        metric_value(&metrics, "switchyard_access_denied_total", &[("route", "jobs"), ("reason", "rate_limited")]);
    assert_eq!(counted, Some(f64::from(limited)));

    // Each key has its bucket; a minute's bucket says so in Retry-After.
    let with_key = |key: &'static str| {
        let url = proxy.url("/keyed");
        async move { get_with(&client(), &url, &[("x-api-key", key)]).await }
    };
    assert_eq!(with_key("alpha").await.status, 200);
    let again = with_key("alpha").await;
    assert_eq!(again.status, 429);
    let retry_after: u64 = again.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(again.headers["ratelimit-policy"], "\"route\";q=1;w=60");
    assert_eq!(with_key("beta").await.status, 200, "another key, another bucket");
    // Without the key a request is limited by its client's own bucket, not
    // by one that every keyless client shares.
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/keyed", &[]).await.0, 200);
    assert_eq!(get_from("127.0.0.1", proxy.addr, "/keyed", &[]).await.0, 429);
    assert_eq!(get_from("127.0.0.2", proxy.addr, "/keyed", &[]).await.0, 200, "another client without a key");
}
