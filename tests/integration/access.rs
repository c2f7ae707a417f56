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

    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let denied = metric_value(&metrics, "switchyard_access_denied_total", &[("route", "jobs"), ("reason", "address")]);
    assert_eq!(denied, Some(3.0));
    let requests = metric_value(&metrics, "switchyard_requests_total", &[("route", "jobs"), ("code", "403")]);
    assert_eq!(requests, Some(3.0));

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
    let proxy = FileProxy::start(&config(backend.addr, rules, "trusted_proxies: [\"127.0.0.1\"]\n")).await;
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

    proxy.replace_config(&config(backend.addr, "", ""));
    proxy.wait_for_generation(2).await;
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
