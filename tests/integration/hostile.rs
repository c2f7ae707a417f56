//! Hostile clients on raw sockets: nothing the proxy did not parse as exactly
//! one request reaches a backend, and one bad client never harms another.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends `bytes` and reads until the proxy closes the connection. The proxy
/// must close it within `limit`: silence is a failure, not a pass.
pub async fn exchange_until_closed(addr: std::net::SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    match read {
        Ok(_) => text,
        Err(_) => {
            panic!("the proxy neither closed the connection nor stopped talking within {limit:?}; it sent {text:?}")
        }
    }
}

#[tokio::test]
async fn connect_is_refused_and_the_bytes_after_it_never_reach_a_backend() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let smuggled = b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n\
                     GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = exchange_until_closed(proxy.addr, smuggled, Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "one answer, then the connection closed: {answer}");
    assert_eq!(backend.hits(), 0, "nothing after the CONNECT head was forwarded");
}

#[tokio::test]
async fn a_missing_or_doubled_host_is_400_and_an_absolute_target_wins_over_host() {
    let target = Backend::start("target").await;
    let other = Backend::start("other").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - {{ match: {{ host: target.example }}, upstream: target }}\n  - {{ upstream: other }}\nupstreams:\n  target:\n    backends: [{{ address: \"{}\" }}]\n  other:\n    backends: [{{ address: \"{}\" }}]\n",
        target.addr, other.addr
    );
    let proxy = start_proxy(&yaml).await;
    for (case, bytes) in [
        ("no Host", &b"GET / HTTP/1.1\r\n\r\n"[..]),
        ("two different Hosts", b"GET / HTTP/1.1\r\nHost: target.example\r\nHost: other.example\r\n\r\n"),
        ("the same Host twice", b"GET / HTTP/1.1\r\nHost: target.example\r\nHost: target.example\r\n\r\n"),
    ] {
        let answer = exchange_until_closed(proxy.addr, bytes, Duration::from_secs(20)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{case}: {answer}");
    }
    assert_eq!(target.hits() + other.hits(), 0, "no request without exactly one Host was forwarded");

    // RFC 9112 3.2.2: the absolute-form target's authority is the host.
    let absolute = b"GET http://target.example/job HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    let answer = exchange_until_closed(proxy.addr, absolute, Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("target"), "{answer}");
    assert_eq!((target.hits(), other.hits()), (1, 0), "routed by the target's host");
    let seen = target.stats.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["host"], "target.example");
    assert_eq!(seen["x-forwarded-host"], "target.example");
}

#[tokio::test]
async fn an_h2c_upgrade_is_stripped_and_websocket_is_the_only_upgrade_tunnelled() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let upgrade = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                    HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(upgrade).await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buffer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "answered as plain HTTP/1.1, not switched: {answer}");
    let seen = backend.stats.last_headers.lock().unwrap().clone().unwrap();
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(!seen.contains_key(name), "`{name}` reached the backend: {seen:?}");
    }
    // The same connection still speaks HTTP/1.1 to the proxy.
    stream.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn malformed_requests_get_400_or_a_closed_connection_and_harm_no_one() {
    let backend = Backend::start("a").await;
    let yaml = PoolConfig::new(&[&backend]).balance("{ policy: round_robin }").limit("max_header_bytes", 8192).yaml();
    let proxy = start_proxy(&yaml).await;
    // Another client's request is in flight the whole time.
    let client = client();
    let bystander = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the bystander's request", Duration::from_secs(10), || backend.in_flight() == 1).await;
    let huge_header = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(20_000));
    let cases: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(),
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
        huge_header.into_bytes(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x09\x00\x00\x00\x00\x00garbage!!".to_vec(),
    ];
    let hits_before = backend.hits();
    for case in cases {
        let shown = String::from_utf8_lossy(&case[..case.len().min(40)]).into_owned();
        let answer = exchange_until_closed(proxy.addr, &case, Duration::from_secs(20)).await;
        let refused = answer.is_empty() || answer.starts_with("HTTP/1.1 4") || !answer.starts_with("HTTP/1.1");
        assert!(refused, "answer to {shown:?}: {answer}");
        // The proxy is still up and serving everyone else.
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    assert_eq!(backend.hits() - hits_before, 8, "only the 8 well-formed probes between cases reached the backend");
    assert!(!bystander.is_finished(), "the bystander is still being served");
    backend.release_held();
    assert_eq!(bystander.await.unwrap().status, 200, "the bystander's request completed unharmed");
}

/// Reads `count` responses framed by `Content-Length` from `stream`; their heads.
async fn read_responses(stream: &mut TcpStream, count: usize) -> Vec<String> {
    let mut received = Vec::new();
    let mut heads = Vec::new();
    let mut buffer = [0u8; 4096];
    while heads.len() < count {
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {} responses: {:?}", heads.len(), String::from_utf8_lossy(&received));
            received.extend_from_slice(&buffer[..n]);
            continue;
        };
        let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |value| value.trim().parse().unwrap());
        if received.len() < end + 4 + length {
            let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer)).await.unwrap().unwrap();
            assert!(n > 0, "closed mid-response");
            received.extend_from_slice(&buffer[..n]);
            continue;
        }
        received.drain(..end + 4 + length);
        heads.push(head);
    }
    assert!(received.is_empty(), "more than {count} responses: {:?}", String::from_utf8_lossy(&received));
    heads
}

#[tokio::test]
async fn one_connection_carries_bodies_chunks_and_pipelined_requests_each_read_once() {
    // Over HTTP/2 to the backend too, whose client stops reading a body at
    // its declared length rather than asking for its end.
    for h2c in [false, true] {
        let backend = Backend::start("a").await;
        let mut yaml = simple_config("{ policy: round_robin }", &[&backend], "");
        if h2c {
            yaml = yaml.edit("  pool:\n", "  pool:\n    protocol: h2c\n");
        }
        let proxy = start_proxy(&yaml).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        // Three requests in one write: a body by length, a body in chunks, none.
        stream
            .write_all(
                b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                  POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n\
                  GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            .await
            .unwrap();
        let heads = read_responses(&mut stream, 3).await;
        for head in &heads {
            assert!(head.starts_with("http/1.1 200"), "h2c {h2c}: {head}");
            assert!(!head.contains("connection: close"), "h2c {h2c}: {head}");
        }
        assert_eq!(backend.hits(), 3);
        let received = backend.stats.bytes_received.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(received, 12, "each body whole, once");
        // The connection is still open for more, a body known by length included.
        stream.write_all(b"PUT /four HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz").await.unwrap();
        let head = &read_responses(&mut stream, 1).await[0];
        assert!(head.starts_with("http/1.1 200") && !head.contains("connection: close"), "h2c {h2c}: {head}");
        stream.write_all(b"GET /five HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(read_responses(&mut stream, 1).await[0].starts_with("http/1.1 200"));
        assert_eq!(backend.hits(), 5);
    }
}

#[tokio::test]
async fn a_client_that_waits_on_expect_gets_100_continue_then_its_response() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config("{ policy: round_robin }", &[&backend], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    // Nothing of the body is sent until the proxy says to.
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "closed before 100 Continue: {:?}", String::from_utf8_lossy(&interim));
        interim.push(byte[0]);
    }
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let heads = read_responses(&mut stream, 1).await;
    assert!(heads[0].starts_with("http/1.1 200"), "{}", heads[0]);
    assert_eq!(backend.stats.bytes_received.load(std::sync::atomic::Ordering::SeqCst), 5);
}
