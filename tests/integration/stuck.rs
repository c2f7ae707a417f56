//! Stuck clients and stuck backends: every wait has a bound, a one-job bot is
//! never pinned by a client that stalls, and a timeout is charged to the
//! backend that caused it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// One bot that runs one job at a time, with a queue in front of it.
fn one_job_bot(bot: &Backend, limits: &str, upstream_extra: &str) -> String {
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nlimits: {{ {limits} }}\nroutes:\n  - upstream: bots\nupstreams:\n  bots:\n    backends: [{{ address: \"{}\", max_concurrency: 1 }}]\n    queue: {{ max_waiting: 10, timeout: 30s }}\n{upstream_extra}",
        bot.addr
    )
}

async fn backend_status(proxy: &Proxy) -> Value {
    let admin = proxy.running.admin_addr().await;
    let answer = get(&client(), &format!("http://{admin}/status")).await;
    serde_json::from_str::<Value>(&answer.body).unwrap()["upstreams"][0]["backends"][0].clone()
}

#[tokio::test]
async fn a_client_that_stalls_its_upload_gets_408_frees_the_bot_and_is_not_blamed_on_it() {
    let bot = Backend::start("bot").await;
    let passive = "    health: { passive: { consecutive_failures: 1, ejection_time: 60s } }\n";
    let proxy = start_proxy(&one_job_bot(&bot, "client_body_timeout: 300ms", passive)).await;
    let stall = |head: &'static [u8]| async move {
        let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
        stalled.write_all(head).await.unwrap();
        stalled
    };
    let ended = |mut stalled: TcpStream| async move {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut answer))
            .await
            .expect("the proxy ends the stalled exchange")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    // A chunked upload streams to the bot as it comes, and stalls there.
    let stalled =
        stall(b"POST /job HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n").await;
    wait_until("the stalled upload to reach the bot", Duration::from_secs(10), || bot.in_flight() == 1).await;
    let answer = ended(stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The bot is free for the next job and was not ejected for the client's stall.
    let next = get(&client(), &proxy.url("/next")).await;
    assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "bot"));
    assert!(backend_status(&proxy).await["ejected_for_seconds"].is_null());

    // A small body of declared length is read whole before a queued job
    // takes a bot (so it can go back to the queue): its stall never
    // reaches the bot at all.
    let hits = bot.hits();
    let stalled = stall(b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await;
    let answer = ended(stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(bot.hits(), hits, "the bot never saw the stalled job");
}

#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_cut_off_and_frees_the_bot() {
    let bot = Backend::start("bot").await;
    let proxy = start_proxy(&one_job_bot(&bot, "client_send_timeout: 300ms", "")).await;
    let mut reader = TcpStream::connect(proxy.addr).await.unwrap();
    // 256 MiB: far more than the socket buffers between the client and the proxy.
    reader.write_all(b"GET /download?bytes=268435456 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    wait_until("the download to start", Duration::from_secs(10), || bot.hits() == 1).await;
    // The client reads nothing. The next job still gets the bot.
    let next = get(&client(), &proxy.url("/next")).await;
    assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "bot"));
    // And the stuck client's connection was closed, not left open.
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    closed.await.expect("the stuck client's connection ends");
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a
/// connect to it hangs, like a host that does not answer.
fn unanswering_address() -> (std::net::SocketAddr, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Fill the backlog; each extra connect would hang, so stop at the first slow one.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => fillers.push(stream),
            Err(_) => break,
        }
    }
    std::mem::forget(listener);
    (addr, fillers)
}

#[tokio::test]
async fn connect_timeout_bounds_a_connect_that_gets_no_answer() {
    let (addr, _fillers) = unanswering_address();
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nlimits: {{ connect_timeout: 300ms }}\nroutes: [{{ upstream: pool, timeout: 3s }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let answer = get(&client(), &proxy.url("/")).await;
    // The route timeout (3s) would give 504; the connect timeout gives 502 first.
    assert_eq!((answer.status.as_u16(), answer.error_code()), (502, Some("upstream_connect")), "{}", answer.body);
}

#[tokio::test]
async fn a_route_timeout_after_queueing_counts_against_the_bot() {
    let bot = Backend::start("bot").await;
    let passive = "    health: { passive: { consecutive_failures: 5, ejection_time: 60s } }\n";
    let yaml = one_job_bot(&bot, "", passive).edit("  - upstream: bots\n", "  - upstream: bots\n    timeout: 600ms\n");
    let proxy = start_proxy(&yaml).await;
    let client = client();
    let first = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the first job on the bot", Duration::from_secs(10), || bot.in_flight() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The second job queues behind the first, gets the bot when the first times
    // out, and times out there itself: two timeouts of the bot's own making.
    let second = get(&client, &proxy.url("/hold")).await;
    assert_eq!((second.status.as_u16(), second.error_code()), (504, Some("upstream_timeout")));
    assert_eq!(first.await.unwrap().status, 504);
    assert_eq!(bot.hits(), 2, "both jobs reached the bot");
    let status = backend_status(&proxy).await;
    assert_eq!(status["consecutive_request_failures"], 2, "both timeouts counted: {status}");
    bot.release_held();
}

#[tokio::test]
async fn a_queued_request_never_starts_on_a_backend_a_reload_removed() {
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    let config = |bot: &Backend| {
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: bots\nupstreams:\n  bots:\n    backends: [{{ address: \"{}\", max_concurrency: 1 }}]\n    queue: {{ max_waiting: 10, timeout: 30s }}\n",
            bot.addr
        )
    };
    let proxy = FileProxy::start(&config(&old)).await;
    let client = client();
    let running = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the running job", Duration::from_secs(10), || old.in_flight() == 1).await;
    let queued = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/queued"));
        async move { get(&client, &url).await }
    });
    let admin = proxy.admin;
    wait_until_async("the second job to queue", || async {
        let status = get(&crate::support::client(), &format!("http://{admin}/status")).await;
        serde_json::from_str::<Value>(&status.body).unwrap()["upstreams"][0]["queue_waiting"] == 1
    })
    .await;
    proxy.replace_config(&config(&new));
    proxy.wait_for_generation(2).await;
    old.release_held();
    assert_eq!(running.await.unwrap().status, 200, "the running job finished on the removed bot");
    let queued = tokio::time::timeout(Duration::from_secs(30), queued).await.expect("the queued job is answered");
    let queued = queued.unwrap();
    assert_eq!(old.hits(), 1, "the queued job never started on the removed bot (answer: {})", queued.status);
    // It went on with the upstream the reload put in place.
    assert_eq!((queued.status.as_u16(), queued.body.as_str()), (200, "new"));
    assert_eq!(new.hits(), 1);
}

async fn ws_echo_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `switchyard_connections_open` of `listener` (a name no other test uses:
/// tests share the process's metrics).
async fn connections_open(proxy: &Proxy, listener: &str) -> f64 {
    let admin = proxy.running.admin_addr().await;
    let scrape = scrape(&format!("http://{admin}/metrics")).await;
    metric_value(&scrape, "switchyard_connections_open", &[("listener", listener)])
        .expect("switchyard_connections_open is exported")
}

#[tokio::test]
async fn a_websocket_tunnel_counts_as_an_open_connection_under_max_connections() {
    let backend = ws_echo_backend().await;
    let yaml = format!(
        "listeners: [{{ name: tunnel-count, bind: \"127.0.0.1:0\" }}]\nlimits: {{ max_connections: 1 }}\nroutes: [{{ upstream: ws }}]\nupstreams:\n  ws:\n    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo", proxy.addr)).await.unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "hello");
    assert_eq!(connections_open(&proxy, "tunnel-count").await, 1.0, "the tunnel is an open connection");
    // At max_connections, another client waits until the tunnel closes.
    let waiting = tokio::spawn({
        let url = proxy.url("/");
        async move { get(&client(), &url).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a second connection was served while the tunnel held the only slot");
    socket.close(None).await.unwrap();
    drop(socket);
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("served once the tunnel closed");
    assert_ne!(answer.unwrap().status.as_u16(), 0);
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_shutdown_drains_tunnels_within_the_grace() {
    let backend = ws_echo_backend().await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nlimits: {{ tunnel_idle_timeout: 400ms, shutdown_grace: 1s }}\nroutes: [{{ upstream: ws }}]\nupstreams:\n  ws:\n    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let url = format!("ws://{}/echo", proxy.addr);

    // Idle: no message either way, and the proxy closes the tunnel.
    let (mut idle, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), idle.next()).await.expect("an idle tunnel is closed");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");

    // Busy through a shutdown: it keeps working during the grace, then is closed
    // and the shutdown completes.
    let (mut busy, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let shutdown = tokio::spawn(proxy.running.shutdown());
    for i in 0..3 {
        busy.send(Message::text(format!("{i}"))).await.unwrap();
        let echoed = busy.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("{i}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!shutdown.is_finished(), "shutdown waits for the open tunnel");
    // Keep the tunnel active so only the grace can end it.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if busy.send(Message::text("ping")).await.is_err() {
                return;
            }
            match busy.next().await {
                Some(Ok(Message::Text(_))) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => return,
            }
        }
    });
    ended.await.expect("the tunnel is closed when the grace runs out");
    tokio::time::timeout(Duration::from_secs(20), shutdown).await.expect("shutdown finishes").unwrap();
}

#[tokio::test]
async fn a_stuck_backend_with_a_per_try_timeout_is_retried_elsewhere() {
    let stuck = Backend::start("stuck").await;
    let fast = Backend::start("fast").await;
    stuck.set_delay(Duration::from_secs(30));
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: pool\n    retry: {{ attempts: 2, per_try_timeout: 300ms, backoff: {{ base: 1ms, max: 2ms }} }}\nupstreams:\n  pool:\n    balance: {{ policy: round_robin }}\n    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]\n",
        stuck.addr, fast.addr
    );
    let proxy = start_proxy(&yaml).await;
    // Round robin sends the first request to the stuck backend first.
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "fast"));
    assert_eq!((stuck.hits(), fast.hits()), (1, 1));
    let admin = proxy.running.admin_addr().await;
    let scrape = scrape(&format!("http://{admin}/metrics")).await;
    assert_eq!(metric_value(&scrape, "switchyard_retries_total", &[("reason", "timeout")]), Some(1.0));
}

/// A proxy whose clients have 300 ms to send a head and a minute between requests.
async fn proxy_with_a_short_head_timeout() -> (Backend, Proxy) {
    let backend = Backend::start("a").await;
    let yaml = PoolConfig::new(&[&backend])
        .balance("{ policy: round_robin }")
        .limit("header_read_timeout", "300ms")
        .limit("idle_timeout", "60s")
        .yaml();
    let proxy = start_proxy(&yaml).await;
    (backend, proxy)
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_by_header_read_timeout() {
    let (backend, proxy) = proxy_with_a_short_head_timeout().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("a half-sent head is not waited for forever")
        .unwrap();
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_keep_alive_connections_next_head_is_bounded_from_its_first_byte() {
    let (backend, proxy) = proxy_with_a_short_head_timeout().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    // The next head starts and stops: only header_read_timeout, not the
    // minute of idle_timeout, may keep the connection waiting for the rest.
    stream.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("a half-sent second head is not waited for until idle_timeout")
        .unwrap();
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn max_connections_holds_the_next_client_until_one_leaves() {
    let backend = Backend::start("a").await;
    let yaml = PoolConfig::new(&[&backend])
        .balance("{ policy: round_robin }")
        .limit("max_connections", 2)
        .listener_name("connection-cap")
        .yaml();
    let proxy = start_proxy(&yaml).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buffer = [0u8; 1024];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    assert_eq!(connections_open(&proxy, "connection-cap").await, 2.0);
    let third = tokio::spawn({
        let url = proxy.url("/");
        async move { get(&client(), &url).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection was served at max_connections 2");
    drop(open.pop());
    let answer = tokio::time::timeout(Duration::from_secs(20), third).await.expect("served once one left").unwrap();
    assert_eq!(answer.status, 200);
}
