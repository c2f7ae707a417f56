//! Where the proxy and a backend could disagree about what was sent, and the
//! waits after a response head: each against real sockets, with scripted
//! backends that misbehave the way real ones do.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A backend scripted at the byte level: `serve` runs for each connection
/// with its index (0 for the first).
async fn scripted<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let serve = Arc::new(serve);
        for index in 0.. {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(serve(stream, index));
        }
    });
    addr
}

/// Reads one request head from `stream` (after whatever `buf` holds);
/// returns it, leaving the bytes after it in `buf`. `None` at the end.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// Sends `request` on a new connection and reads until the proxy closes it
/// (bounded): everything the client got, and whether the connection ended
/// within `limit`.
async fn exchange(proxy: SocketAddr, request: &[u8], limit: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), ended)
}

async fn status_of(proxy: &Proxy) -> Value {
    let admin = proxy.running.admin_addr().await;
    serde_json::from_str(&get(&client(), &format!("http://{admin}/status")).await.body).unwrap()
}

/// One bot that runs one job at a time, with a queue in front of it.
fn one_job_bot(bot: SocketAddr, limits: &str) -> String {
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nlimits: {{ {limits} }}\nroutes:\n  - upstream: bots\nupstreams:\n  bots:\n    backends: [{{ address: \"{bot}\", max_concurrency: 1 }}]\n    queue: {{ max_waiting: 10, timeout: 60s }}\n"
    )
}

/// A bot whose first response promises 100 bytes, sends 3 (`abc`) and then
/// nothing, its connection left open until the proxy lets go of it; every
/// later response is whole (`next`).
async fn bot_stalling_its_first_response() -> SocketAddr {
    scripted(|mut stream, index| async move {
        let mut buf = Vec::new();
        while read_head(&mut stream, &mut buf).await.is_some() {
            let reply: &[u8] = if index == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
            };
            if stream.write_all(reply).await.is_err() {
                return;
            }
            if index == 0 {
                let _ = stream.read(&mut [0u8; 1]).await;
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_off_and_frees_its_bot() {
    let bot = bot_stalling_its_first_response().await;
    let proxy = start_proxy(&one_job_bot(bot, "backend_read_timeout: 1s")).await;

    let started = Instant::now();
    let stalled =
        tokio::spawn(exchange(proxy.addr, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(60)));
    wait_until_async("the stalled response to hold the bot", || async {
        status_of(&proxy).await["upstreams"][0]["backends"][0]["in_flight"] == 1
    })
    .await;
    // The next job waits for the bot; it gets it once the stall is cut.
    let next = get(&client(), &proxy.url("/second")).await;
    assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "next"), "the bot was freed for the next job");
    assert!(started.elapsed() >= Duration::from_secs(1), "not before backend_read_timeout");

    let (got, ended) = stalled.await.unwrap();
    assert!(ended, "the stalled client's connection is closed");
    assert!(got.starts_with("HTTP/1.1 200 OK") && got.ends_with("abc"), "the head and 3 bytes, then the cut: {got:?}");
    let backend = &status_of(&proxy).await["upstreams"][0]["backends"][0];
    assert_eq!(backend["failed_requests"], 1, "the stall counts against the backend: {backend}");
}

#[tokio::test]
async fn an_http2_stream_the_client_gives_no_window_is_reset_and_frees_its_bot() {
    let bot = Backend::start("bot").await;
    let proxy = start_proxy(&one_job_bot(bot.addr, "client_send_timeout: 1s")).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    // A client that gives every stream a window of 0 and never opens it.
    let (h2, connection) =
        h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = |path: &str| http::Request::get(format!("http://bots{path}")).body(()).unwrap();
    let (stuck, _) = h2.send_request(request("/download?bytes=100000"), true).unwrap();
    let stuck = stuck.await.unwrap();
    assert_eq!(stuck.status(), 200, "the head goes out: HEADERS are not flow-controlled");
    wait_until("the bot to be busy with the stuck stream", Duration::from_secs(10), || {
        bot.in_flight() == 0 && bot.hits() == 1
    })
    .await;

    // A second stream on the same connection waits in the queue for the bot.
    let mut h2 = h2.ready().await.unwrap();
    let (second, _) = h2.send_request(request("/second"), true).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second stream is answered once the stuck one is reset")
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-backend"], "bot", "the connection's other stream went on");
    assert_eq!(bot.hits(), 2);

    // The stuck stream itself was reset with CANCEL.
    let mut body = stuck.into_body();
    let error = tokio::time::timeout(Duration::from_secs(30), body.data()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
}

#[tokio::test]
async fn an_http2_connection_left_holding_unsent_bytes_is_closed_when_idle() {
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).limit("idle_timeout", "1s").limit("client_send_timeout", "1s").yaml();
    let proxy = start_proxy(&yaml).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    // A window of one byte: the whole body is handed over at once, the
    // stream is done on the proxy's side, and two bytes wait in h2's buffer
    // for a window the client never opens.
    let (h2, connection) =
        h2::client::Builder::new().initial_window_size(1).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let (answer, _) = h2.send_request(http::Request::get("http://bots/").body(()).unwrap(), true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let _unread = answer.into_body();
    let _still_open = h2;
    tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("the idle connection is closed, not kept for its unsent bytes")
        .unwrap()
        .ok();
}

#[tokio::test]
async fn http2_clients_get_at_most_max_concurrent_streams() {
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).limit("max_concurrent_streams", 7).yaml();
    let proxy = start_proxy(&yaml).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    // The server's SETTINGS arrive with the first exchange.
    let (answer, _) = h2.send_request(http::Request::get("http://bots/").body(()).unwrap(), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    assert_eq!(h2.current_max_send_streams(), 7);
}

/// A backend that answers `Expect: 100-continue` with 417 at once, without
/// reading the body, and then reads that body as the next request, as some
/// servers do. A request for `/smuggled` is answered only when another
/// request follows on the connection, as a pipelining server would.
async fn expect_smuggling_backend(smuggled: Arc<AtomicUsize>) -> SocketAddr {
    scripted(move |mut stream, _| {
        let smuggled = Arc::clone(&smuggled);
        async move {
            let mut buf = Vec::new();
            let mut pending: Option<&'static [u8]> = None;
            while let Some(head) = read_head(&mut stream, &mut buf).await {
                if let Some(earlier) = pending.take() {
                    let _ = stream.write_all(earlier).await;
                }
                let reply: &'static [u8] = if head.to_ascii_lowercase().contains("expect: 100-continue") {
                    b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n"
                } else if head.starts_with("GET /smuggled") {
                    smuggled.fetch_add(1, Ordering::SeqCst);
                    pending = Some(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED");
                    continue;
                } else {
                    let length = content_length(&head);
                    while buf.len() < length {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest"
                };
                if stream.write_all(reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_request_body_behind_expect_is_never_read_as_a_request_by_the_backend() {
    let smuggled = Arc::new(AtomicUsize::new(0));
    let bot = expect_smuggling_backend(Arc::clone(&smuggled)).await;
    let proxy = start_proxy(&format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nworkers: 1\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    backends: [{{ address: \"{bot}\" }}]\n"
    ))
    .await;
    let body = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..3 {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Sent whole, as clients do that do not wait for 100 Continue (curl
        // after a second): the body is behind the head on the wire.
        let (answer, ended) = exchange(proxy.addr, format!("{head}{body}").as_bytes(), Duration::from_secs(30)).await;
        assert!(ended, "{answer}");
        let answer = answer.trim_start_matches("HTTP/1.1 100 Continue\r\n\r\n").to_owned();
        // Later clients, on the pooled backend connection, get their own answers.
        for _ in 0..2 {
            let later = get(&client(), &proxy.url("/later")).await;
            assert_eq!(later.body, "honest", "a later client got another request's answer");
        }
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("honest"), "{answer}");
    }
    assert_eq!(smuggled.load(Ordering::SeqCst), 0, "the backend never read a body as a request");
}

#[tokio::test]
async fn endless_interim_responses_and_a_chunk_size_without_digits_are_malformed() {
    let bot = scripted(|mut stream, _| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut stream, &mut buf).await {
            let reply = if head.starts_with("GET /interim") {
                b"HTTP/1.1 100 Continue\r\n\r\n".repeat(100)
            } else {
                // `\r\n` where a chunk size belongs, then a second response.
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
                    .to_vec()
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots, timeout: 10m }}]\nupstreams:\n  bots:\n    backends: [{{ address: \"{bot}\" }}]\n"
    ))
    .await;
    // `Connection: close`: the exchange ends with the answer, not when the
    // proxy lets an idle keep-alive connection go.
    let interim = b"GET /interim HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (got, ended) = exchange(proxy.addr, interim, Duration::from_secs(30)).await;
    assert!(ended && got.starts_with("HTTP/1.1 502"), "not a wait for the route's 10 minutes: {got:?}");

    let chunks = b"GET /chunks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (got, ended) = exchange(proxy.addr, chunks, Duration::from_secs(30)).await;
    assert!(ended, "{got:?}");
    assert!(!got.ends_with("0\r\n\r\n"), "a malformed body is never ended as if it were whole: {got:?}");
    assert!(!got.contains("SMUGGLED"), "{got:?}");
}

#[tokio::test]
async fn dot_segments_are_resolved_before_routing_and_the_backend_gets_that_path() {
    let public = Backend::start("public").await;
    let yaml = |merge: bool| {
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\npaths: {{ merge_slashes: {merge} }}\nroutes:\n  - {{ match: {{ path_prefix: /public/ }}, upstream: public }}\nupstreams:\n  public:\n    backends: [{{ address: \"{}\" }}]\n",
            public.addr
        )
    };
    let proxy = start_proxy(&yaml(false)).await;
    for client in [client(), h2c_client()] {
        let hits = public.hits();
        for climb in ["/public/../admin", "/public/%2e%2e/admin", "/public/.%2E/admin", "/public/a/../../admin"] {
            let answer = get(&client, &proxy.url(climb)).await;
            assert_eq!((answer.status.as_u16(), answer.error_code()), (404, Some("no_route")), "{climb}");
        }
        assert_eq!(public.hits(), hits, "nothing outside /public/ reached the backend");
        for (sent, forwarded) in [
            ("/public/a/../b?next=/../x", "/public/b?next=/../x"),
            ("/public/./c/%2e/d", "/public/c/d"),
            ("/public/..%2fadmin", "/public/..%2fadmin"),
            ("/public//e", "/public//e"),
        ] {
            assert_eq!(get(&client, &proxy.url(sent)).await.status, 200, "{sent}");
            assert_eq!(public.stats.last_target.lock().unwrap().as_deref(), Some(forwarded), "{sent}");
        }
        let above = get(&client, &proxy.url("/../etc/passwd")).await;
        assert_eq!(above.status, 400);
    }
    let merging = start_proxy(&yaml(true)).await;
    assert_eq!(get(&client(), &merging.url("/public//e///f")).await.status, 200);
    assert_eq!(public.stats.last_target.lock().unwrap().as_deref(), Some("/public/e/f"));
}

/// A client connection from `source` (a loopback address of its own).
async fn connect_from(source: &str, proxy: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(proxy).await.unwrap()
}

/// One request on a new connection from `source`, with `headers`; the
/// backend that answered.
async fn answered_by(proxy: SocketAddr, source: &str, preface: &[u8], headers: &str) -> String {
    let mut stream = connect_from(source, proxy).await;
    stream.write_all(preface).await.unwrap();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer.lines().find_map(|l| l.strip_prefix("x-backend: ")).unwrap().to_owned()
}

fn seen(backends: &[&Backend], name: &str) -> String {
    let headers = backends.iter().find_map(|b| b.stats.last_headers.lock().unwrap().clone()).unwrap();
    headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>().join(" | ")
}

#[tokio::test]
async fn forwarded_headers_are_kept_only_from_trusted_proxies_and_name_the_client_for_hashing() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let list: String = backends.iter().map(|b| format!("      - {{ address: \"{}\" }}\n", b.addr)).collect();
    let proxy = start_proxy(&format!(
        "trusted_proxies: [127.0.0.2, 127.0.0.3/32]\nlisteners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {{ policy: consistent_hash, key: client_ip }}\n    backends:\n{list}"
    ))
    .await;
    let refs: Vec<&Backend> = backends.iter().collect();
    let admin = proxy.running.admin_addr().await;
    let effective = get(&client(), &format!("http://{admin}/config")).await.body;
    assert!(
        effective.contains("127.0.0.2/32") && effective.contains("127.0.0.3/32"),
        "GET /config shows them:\n{effective}"
    );
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil.example\r\n";

    // From an untrusted client every claim is replaced by its own address.
    answered_by(proxy.addr, "127.0.0.1", b"", spoof).await;
    let clear = |b: &[Backend; 3]| b.iter().for_each(|b| *b.stats.last_headers.lock().unwrap() = None);
    assert_eq!(seen(&refs, "x-forwarded-for"), "127.0.0.1");
    assert_eq!(seen(&refs, "x-real-ip"), "127.0.0.1");
    assert_eq!(seen(&refs, "forwarded"), "for=127.0.0.1;proto=http");
    assert_eq!(seen(&refs, "x-forwarded-host"), "x");
    clear(&backends);
    // From a trusted proxy they are kept and appended to.
    answered_by(proxy.addr, "127.0.0.2", b"", spoof).await;
    assert_eq!(seen(&refs, "x-forwarded-for"), "6.6.6.6, 127.0.0.2");
    assert_eq!(seen(&refs, "x-real-ip"), "6.6.6.6");
    assert_eq!(seen(&refs, "forwarded"), "for=6.6.6.6, for=127.0.0.2");
    assert_eq!(seen(&refs, "x-forwarded-host"), "evil.example");

    // client_ip hashing: behind trusted proxies, by the client they name
    // (the same backend through either proxy, and clients spread); from
    // anyone else, by the peer, whatever it claims.
    let mut through_proxies = std::collections::HashSet::new();
    let mut spoofing = std::collections::HashSet::new();
    for i in 0..24 {
        let claim = format!("X-Forwarded-For: 198.51.100.{i}\r\n");
        let first = answered_by(proxy.addr, "127.0.0.2", b"", &claim).await;
        assert_eq!(first, answered_by(proxy.addr, "127.0.0.3", b"", &claim).await, "198.51.100.{i}");
        through_proxies.insert(first);
        spoofing.insert(answered_by(proxy.addr, "127.0.0.1", b"", &claim).await);
    }
    assert!(through_proxies.len() > 1, "24 named clients all hashed alike: the peer was used");
    assert_eq!(spoofing.len(), 1, "an untrusted client chose its backend by what it claimed");
}

#[tokio::test]
async fn a_proxy_protocol_listener_takes_the_client_from_the_header_for_headers_hashing_and_logs() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let list: String = backends.iter().map(|b| format!("      - {{ address: \"{}\" }}\n", b.addr)).collect();
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("switchyard.yaml"), dir.path().join("log"));
    let port = free_port();
    std::fs::write(
        &config,
        with_test_admin(&format!(
            "log: {{ access: true, format: json }}\nlisteners: [{{ bind: \"127.0.0.1:{port}\", proxy_protocol: true }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {{ policy: consistent_hash, key: client_ip }}\n    backends:\n{list}"
        )),
    )
    .unwrap();
    let _proxy = LoggingProxy::start(&config, &log);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until_async("the proxy to listen", || async { TcpStream::connect(addr).await.is_ok() }).await;
    let refs: Vec<&Backend> = backends.iter().collect();

    let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 4711 80\r\n";
    answered_by(addr, "127.0.0.1", v1, "X-Request-Id: via-v1\r\n").await;
    assert_eq!(seen(&refs, "x-forwarded-for"), "203.0.113.9");
    let line = wait_for_log_line(&log, "via-v1").await;
    assert!(line.contains("\"client\":\"203.0.113.9:4711\""), "{line}");

    let mut v2 = Vec::new();
    let source: SocketAddr = "[2001:db8::9]:5555".parse().unwrap();
    proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(
        source,
        "[2001:db8::1]:80".parse().unwrap(),
    ))
    .encode_v2(&mut v2)
    .unwrap();
    backends.iter().for_each(|b| *b.stats.last_headers.lock().unwrap() = None);
    answered_by(addr, "127.0.0.1", &v2, "").await;
    assert_eq!(seen(&refs, "x-forwarded-for"), "2001:db8::9");

    // Hashing follows the header's client, not the balancer's address.
    let mut chosen = std::collections::HashSet::new();
    for i in 0..24 {
        let header = format!("PROXY TCP4 198.51.100.{i} 10.0.0.1 4000 80\r\n");
        let first = answered_by(addr, "127.0.0.1", header.as_bytes(), "").await;
        assert_eq!(first, answered_by(addr, "127.0.0.2", header.as_bytes(), "").await);
        chosen.insert(first);
    }
    assert!(chosen.len() > 1, "24 clients all hashed alike: the balancer's address was used");

    // A connection without the header is closed unanswered, and nothing reaches a backend.
    let hits: usize = backends.iter().map(Backend::hits).sum();
    let (got, ended) = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(30)).await;
    assert!(ended && got.is_empty(), "{got:?}");
    assert_eq!(backends.iter().map(Backend::hits).sum::<usize>(), hits);
}

#[tokio::test]
async fn a_gateway_error_names_the_error_and_never_the_backend_address() {
    let (dead, _) = resetting_backend().await;
    let refused = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    for backend in [dead, refused] {
        let proxy = start_proxy(&format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: secret-pool }}]\nupstreams:\n  secret-pool:\n    backends: [{{ address: \"{backend}\" }}]\n"
        ))
        .await;
        let answer = get(&client(), &proxy.url("/")).await;
        assert_eq!(answer.status, 502);
        let port = backend.port().to_string();
        assert!(!answer.body.contains(&port) && !answer.body.contains("127.0.0.1"), "{}", answer.body);
        assert!(!answer.body.contains("secret-pool"), "{}", answer.body);
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_its_response_stalls_frees_the_bot_at_once() {
    let bot = bot_stalling_its_first_response().await;
    // The backend's silence alone would hold the bot for a minute.
    let proxy = start_proxy(&one_job_bot(bot, "backend_read_timeout: 60s")).await;
    let mut leaving = TcpStream::connect(proxy.addr).await.unwrap();
    leaving.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"abc") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(20), leaving.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(status_of(&proxy).await["upstreams"][0]["backends"][0]["in_flight"], 1);
    drop(leaving);
    // The next job gets the bot long before backend_read_timeout.
    let next = tokio::time::timeout(Duration::from_secs(20), get(&client(), &proxy.url("/second")))
        .await
        .expect("the bot was freed when its client left");
    assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "next"));
}
