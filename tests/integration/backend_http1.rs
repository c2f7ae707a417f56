//! The proxy's own HTTP/1.1 client, against backends that speak HTTP/1.1 at
//! the byte level (a scripted TCP server): every way a response body can be
//! delimited, interim responses, connection reuse and when it must not
//! happen, a backend closing idle connections, malformed responses, request
//! body framing, early answers and bytes that follow a 101.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Each request as received: its head, then its decoded body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What the scripted backend does with one request.
struct Reply {
    /// Written one after another, each flushed on its own.
    writes: Vec<Vec<u8>>,
    /// Close the connection after the reply.
    close: bool,
    /// Answer as soon as the head is read, then drain the body in the background.
    before_body: bool,
}

impl Reply {
    fn new(text: &str) -> Reply {
        Reply { writes: vec![text.as_bytes().to_vec()], close: false, before_body: false }
    }

    fn in_pieces(pieces: &[&str]) -> Reply {
        Reply { writes: pieces.iter().map(|p| p.as_bytes().to_vec()).collect(), close: false, before_body: false }
    }

    fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// A raw HTTP/1.1 backend: reads each request (head and body, decoding
/// `Content-Length` or chunked framing), records it, and answers with what
/// `script` returns for the request line.
struct ScriptedBackend {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Received,
    /// Connections this backend has closed itself.
    closed: Arc<AtomicUsize>,
}

impl ScriptedBackend {
    async fn start(script: fn(&str) -> Reply) -> ScriptedBackend {
        Self::start_closing_idle(script, None).await
    }

    /// With `idle_close`, a connection left idle that long is closed by the backend.
    async fn start_closing_idle(script: fn(&str) -> Reply, idle_close: Option<Duration>) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = ScriptedBackend {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
            closed: Arc::default(),
        };
        let (connections, requests, closed) =
            (Arc::clone(&backend.connections), Arc::clone(&backend.requests), Arc::clone(&backend.closed));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (requests, closed) = (Arc::clone(&requests), Arc::clone(&closed));
                tokio::spawn(async move {
                    serve_scripted(stream, script, requests, idle_close).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(String, Vec<u8>)> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_scripted(
    mut stream: TcpStream,
    script: fn(&str) -> Reply,
    requests: Received,
    idle_close: Option<Duration>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            let read = match idle_close {
                Some(idle) if buf.is_empty() => match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                    Ok(read) => read,
                    Err(_) => return,
                },
                _ => stream.read(&mut chunk).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        let reply = script(head.lines().next().unwrap_or(""));
        if reply.before_body {
            for write in &reply.writes {
                let _ = stream.write_all(write).await;
            }
            // Drain whatever the proxy still sends, then close.
            let mut sink = [0u8; 65536];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        let body = if let Some(length) = header_value(&lower, "content-length") {
            let length: usize = length.parse().unwrap();
            while buf.len() < length {
                let mut chunk = [0u8; 65536];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length).collect()
        } else if header_value(&lower, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            match read_chunked(&mut stream, &mut buf).await {
                Some(body) => body,
                None => return,
            }
        } else {
            Vec::new()
        };
        requests.lock().unwrap().push((head, body));
        for write in &reply.writes {
            if stream.write_all(write).await.is_err() {
                return;
            }
            let _ = stream.flush().await;
            tokio::task::yield_now().await;
            if reply.writes.len() > 1 {
                // Separate writes arrive as separate reads.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if reply.close {
            return;
        }
    }
}

fn header_value<'a>(lower_head: &'a str, name: &str) -> Option<&'a str> {
    lower_head.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':').map(str::trim))
}

/// Decodes a chunked body (trailers included in the returned text's tail are
/// skipped); `None` if the connection ended first.
async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            fill(stream, buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("chunk size");
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    let empty = at == 0;
                    buf.drain(..at + 2);
                    if empty {
                        return Some(body);
                    }
                    continue;
                }
                fill(stream, buf).await?;
            }
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        assert_eq!(&buf[size..size + 2], b"\r\n", "chunk data ends with CRLF");
        buf.drain(..size + 2);
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 65536];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// One worker, so that one client connection's requests share one pool.
fn one_worker_config(backend: &ScriptedBackend) -> String {
    format!(
        "workers: 1\nlisteners:\n  - bind: \"127.0.0.1:0\"\nroutes:\n  - upstream: pool\nupstreams:\n  pool:\n    backends:\n      - {{ address: \"{}\" }}\n",
        backend.addr
    )
}

fn framed_every_way(request_line: &str) -> Reply {
    let path = request_line.split(' ').nth(1).unwrap_or("/");
    match path {
        "/chunked" => Reply::in_pieces(&[
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            "lo\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n",
        ]),
        "/length-in-pieces" => {
            let text = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Kind: pieces\r\n\r\nhello world";
            let pieces: Vec<String> = text.chars().collect::<Vec<_>>().chunks(7).map(|c| c.iter().collect()).collect();
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            Reply::in_pieces(&pieces)
        }
        "/until-close" => Reply::new("HTTP/1.1 200 OK\r\n\r\nhello world").closing(),
        "/continue" => Reply::in_pieces(&[
            "HTTP/1.1 100 Continue\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        ]),
        "/no-content" => Reply::new("HTTP/1.1 204 No Content\r\n\r\n"),
        "/close" => Reply::new("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\nhello world"),
        "/http10" => Reply::new("HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhello world"),
        "/garbage" => Reply::new("SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        "/two-lengths" => Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 11\r\n\r\nhello world"),
        "/cut-short" => Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello world").closing(),
        _ => Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"),
    }
}

#[tokio::test]
async fn response_bodies_framed_every_way_reach_the_client_whole() {
    let backend = ScriptedBackend::start(framed_every_way).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let client = client();
    for path in ["/chunked", "/length-in-pieces", "/until-close", "/continue", "/plain"] {
        let answer = get(&client, &proxy.url(path)).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.body, "hello world", "{path}");
    }
    assert_eq!(get(&client, &proxy.url("/length-in-pieces")).await.headers["x-kind"], "pieces");
    let answer = get(&client, &proxy.url("/no-content")).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (204, ""));
    let answer = send(&client, Request::head(proxy.url("/plain")).body(full("")).unwrap()).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, ""));
    assert_eq!(answer.headers["content-length"], "11");
    // After all that, a plain request still works on whatever is pooled.
    assert_eq!(get(&client, &proxy.url("/plain")).await.body, "hello world");
}

#[tokio::test]
async fn backend_connections_are_reused_only_when_the_response_allows() {
    let backend = ScriptedBackend::start(framed_every_way).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let client = client();
    for path in ["/plain", "/chunked", "/length-in-pieces", "/no-content", "/plain"] {
        for _ in 0..4 {
            assert!(get(&client, &proxy.url(path)).await.status.is_success());
        }
    }
    let head = Request::head(proxy.url("/plain")).body(full("")).unwrap();
    assert_eq!(send(&client, head).await.status, 200);
    assert_eq!(backend.connections(), 1, "every response above leaves the connection reusable");

    for path in ["/close", "/http10", "/until-close"] {
        let before = backend.connections();
        for _ in 0..3 {
            assert_eq!(get(&client, &proxy.url(path)).await.body, "hello world", "{path}");
        }
        // The first may take the pooled connection; each one after needs a new one.
        assert!(backend.connections() >= before + 2, "{path}: {} connections after {before}", backend.connections());
    }
}

fn closes_when_idle(_: &str) -> Reply {
    Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
}

#[tokio::test]
async fn a_backend_closing_idle_connections_costs_no_request() {
    let backend = ScriptedBackend::start_closing_idle(closes_when_idle, Some(Duration::from_millis(50))).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let client = client();
    for round in 1..=5 {
        let answer = get(&client, &proxy.url("/")).await;
        assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "hello world"), "round {round}");
        // The backend closes the now idle pooled connection.
        wait_until("the backend closed its idle connection", Duration::from_secs(10), || {
            backend.closed.load(Ordering::SeqCst) >= round
        })
        .await;
        // Give the proxy's event loop a moment to see the FIN (not a correctness wait:
        // a request before it would also succeed).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.connections(), 5);
}

#[tokio::test]
async fn malformed_or_cut_responses_are_502_and_never_reused() {
    let backend = ScriptedBackend::start(framed_every_way).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let client = client();
    for path in ["/garbage", "/two-lengths"] {
        let answer = get(&client, &proxy.url(path)).await;
        assert_eq!(answer.status, 502, "{path}");
        assert_eq!(answer.error_code(), Some("upstream_reset"), "{path}");
    }
    // A body cut short by the backend closing: the head may already be on its
    // way, so the client sees the response fail, before or after its head.
    let cut = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>()
        .get(proxy.url("/cut-short").parse().unwrap())
        .await;
    let failed = match cut {
        Ok(response) => http_body_util::BodyExt::collect(response.into_body()).await.is_err(),
        Err(_) => true,
    };
    assert!(failed, "a response cut short is not passed off as complete");
    let connections = backend.connections();
    assert_eq!(get(&client, &proxy.url("/plain")).await.body, "hello world");
    assert_eq!(backend.connections(), connections + 1, "no failed connection went back to the pool");
}

fn echo_ok(_: &str) -> Reply {
    Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
}

#[tokio::test]
async fn request_bodies_are_framed_for_the_backend() {
    let backend = ScriptedBackend::start(echo_ok).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let client = client();
    // Unknown length (streamed by the client with chunked encoding): chunked to the backend.
    let streamed = Request::post(proxy.url("/streamed")).body(streaming_body(200_000)).unwrap();
    assert_eq!(send(&client, streamed).await.body, "ok");
    // Known length.
    let sized = Request::post(proxy.url("/sized")).body(full("0123456789")).unwrap();
    assert_eq!(send(&client, sized).await.body, "ok");
    // Empty POST: an explicit zero length.
    let empty = Request::post(proxy.url("/empty")).body(full("")).unwrap();
    assert_eq!(send(&client, empty).await.body, "ok");

    let requests = backend.requests();
    let (head, body) = &requests[0];
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked\r\n"), "{head}");
    assert_eq!(body.len(), 200_000);
    assert!(body.iter().all(|&b| b == b'x'));
    let (head, body) = &requests[1];
    assert!(head.to_ascii_lowercase().contains("content-length: 10\r\n"), "{head}");
    assert_eq!(body, b"0123456789");
    let (head, body) = &requests[2];
    assert!(head.to_ascii_lowercase().contains("content-length: 0\r\n"), "{head}");
    assert!(body.is_empty());
    assert_eq!(backend.connections(), 1);
}

fn refuses_early(_: &str) -> Reply {
    Reply {
        writes: vec![
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!".to_vec()
        ],
        close: true,
        before_body: true,
    }
}

#[tokio::test]
async fn an_answer_before_the_whole_body_reaches_the_client() {
    let backend = ScriptedBackend::start(refuses_early).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    // The client announces a large body, sends a little of it, and waits: the
    // backend's early answer must reach it without the rest of the body.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789").await.unwrap();
    let answer = read_until(&mut stream, b"too big!").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// What arrives on `stream` until it ends with `end` (or the stream closes), within 10 s.
async fn read_until(stream: &mut TcpStream, end: &[u8]) -> String {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.ends_with(end) {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await.expect("bytes arrive in time");
        match read.unwrap() {
            0 => break,
            n => seen.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn upgrades_with_early_bytes(_: &str) -> Reply {
    Reply::new("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nEARLY")
}

#[tokio::test]
async fn bytes_the_backend_sends_right_after_a_101_reach_the_client() {
    let backend = ScriptedBackend::start(upgrades_with_early_bytes).await;
    let proxy = start_proxy(&one_worker_config(&backend)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let text = read_until(&mut stream, b"EARLY").await;
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\nEARLY"), "{text}");
}
