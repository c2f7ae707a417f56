//! Forwarding's decisions (retries, the route's deadline, reroutes after a
//! reload) on paused time, with scripted backends in place of the client.
//!
//! The request reaches `Forward` as the proxy's layers hand it on: a real
//! hyper server connection (over an in-memory pipe) makes the request and
//! its body, so the body's replay is the real one. Only the backends are
//! stand-ins: the integration tests run the same paths against real servers,
//! in real time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower::Service;

use super::*;
use crate::backend::Backend;
use crate::client::ConnectError;
use crate::config::tls::UpstreamTls;
use crate::config::UpstreamProtocol;
use crate::conn::ConnInfo;
use crate::notes::NotedRequest;
use crate::state::Snapshot;

/// What a scripted backend does with one try.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// The connection is refused: nothing was sent.
    Refuse,
    /// The connection is reset after the request went out.
    Reset,
    /// The request goes out and nothing ever comes back.
    Silent,
}

/// One try as the backend saw it.
#[derive(Debug)]
struct Seen {
    backend: String,
    /// Since the test started, on the paused clock.
    at: Duration,
    body: Bytes,
}

/// Answers tries in order from a script (200 once it is used up) and
/// records what each try carried.
struct Scripted {
    started: tokio::time::Instant,
    script: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<Seen>>,
}

impl Scripted {
    fn new(script: &[Answer]) -> Arc<Scripted> {
        Arc::new(Scripted {
            started: tokio::time::Instant::now(),
            script: Mutex::new(script.iter().copied().collect()),
            seen: Mutex::default(),
        })
    }

    fn backends(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|seen| seen.backend.clone()).collect()
    }
}

impl SendToBackend for Scripted {
    async fn send<'a>(
        &'a self,
        _protocol: UpstreamProtocol,
        _tls: Option<&'a UpstreamTls>,
        backend: &'a Backend,
        request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let at = self.started.elapsed();
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Answer::Status(200));
        if let Answer::Refuse = answer {
            return Err(SendError::Connect(Arc::new(ConnectError::Refused)));
        }
        let body = request.into_body().collect().await.map_err(SendError::Request)?.to_bytes();
        self.seen.lock().unwrap().push(Seen { backend: backend.address.to_string(), at, body });
        match answer {
            Answer::Status(status) => {
                let body = crate::body::full(format!("from {}", backend.address));
                let mut response = Response::new(UpstreamBody::scripted(body));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok(response)
            }
            Answer::Reset => {
                Err(SendError::Request(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))))
            }
            Answer::Silent => std::future::pending().await,
            Answer::Refuse => unreachable!("answered above"),
        }
    }
}

fn snapshot(yaml: &str, previous: Option<&Snapshot>) -> Arc<Snapshot> {
    let config = crate::config::parse(yaml, "test.yaml").unwrap();
    Arc::new(Snapshot::compile(&config, previous, previous.map_or(1, |p| p.generation + 1)))
}

/// `upstream` with two backends behind a route with `route` settings.
fn two_bots(route: &str) -> String {
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots, {route} }}]\nupstreams:\n  bots:\n    \
         backends: [{{ address: \"10.0.0.1:80\" }}, {{ address: \"10.0.0.2:80\" }}]\n"
    )
}

/// Sends `request` from a client through `Forward` on `snapshot` to
/// `backends`: the status and body the client got, and how long it took.
async fn exchange(
    snapshot: Arc<Snapshot>,
    backends: Arc<Scripted>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, Bytes, Duration) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let share: crate::state::SnapshotShare = Arc::new(snapshot);
    let forward = Forward::new(backends);
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let request = request.map(crate::body::ClientRequestBody::Http2);
        let conn = Arc::new(ConnInfo::new("192.0.2.7:50000".parse().unwrap(), "test".into()));
        let notes = Arc::new(RequestNotes::new(conn, Arc::clone(&share)));
        let routed = NotedRequest { request, notes }.routed(0);
        let mut forward = forward.clone();
        async move { Ok::<_, Infallible>(forward.call(routed).await.unwrap_or_else(ProxyError::into_response)) }
    });
    tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_io), service));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_io)).await.unwrap();
    tokio::spawn(connection);
    let started = tokio::time::Instant::now();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body, started.elapsed())
}

fn get() -> Request<Full<Bytes>> {
    Request::get("/status").header(header::HOST, "bots.test").body(Full::default()).unwrap()
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/jobs")
        .header(header::HOST, "bots.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_retried_on_the_other_backend_with_the_same_body() {
    let yaml = two_bots("retry: { attempts: 3, backoff: { base: 1ms, max: 1ms } }");
    let backends = Scripted::new(&[Answer::Refuse]);
    let (status, body, _) = exchange(snapshot(&yaml, None), Arc::clone(&backends), post("job-42")).await;
    assert_eq!(status, StatusCode::OK);
    let seen = backends.seen.lock().unwrap();
    // The refused try is not in `seen`: nothing reached that backend.
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, "job-42", "the whole body, replayed");
    assert_eq!(body, format!("from {}", seen[0].backend));
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_a_backend_not_tried_yet() {
    // A hash of the path picks the same backend for every try, but for the
    // exclusion of those tried.
    let yaml = two_bots("retry: { attempts: 2, backoff: { base: 1ms, max: 1ms } }")
        .replace("  bots:\n", "  bots:\n    balance: { policy: consistent_hash, key: path }\n");
    let backends = Scripted::new(&[Answer::Status(503)]);
    let (status, _, _) = exchange(snapshot(&yaml, None), Arc::clone(&backends), get()).await;
    assert_eq!(status, StatusCode::OK, "the 503 is retried");
    let tried = backends.backends();
    assert_eq!(tried.len(), 2);
    assert_ne!(tried[0], tried[1], "the second try goes to the other backend");
}

/// Three per-try timeouts of 3 s, then a fourth try cut short by the
/// route's 10 s deadline: the client has its 504 at 10 s, not at 12 s.
#[tokio::test(start_paused = true)]
async fn per_try_timeouts_are_retried_and_the_route_deadline_ends_the_last_try() {
    let yaml = two_bots("timeout: 10s, retry: { attempts: 6, per_try_timeout: 3s, backoff: { base: 1ms, max: 1ms } }");
    let backends = Scripted::new(&[Answer::Silent; 6]);
    let (status, _, took) = exchange(snapshot(&yaml, None), Arc::clone(&backends), get()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let starts: Vec<u128> = backends.seen.lock().unwrap().iter().map(|seen| seen.at.as_millis()).collect();
    assert_eq!(starts.len(), 4, "tries at 0, 3, 6 and 9 s: {starts:?}");
    for (start, second) in starts.iter().zip([0, 3_000, 6_000, 9_000]) {
        // Each backoff is under a millisecond.
        assert!((second..second + 5).contains(start), "tries started at {starts:?} ms");
    }
    assert!(took >= Duration::from_secs(10) && took < Duration::from_millis(10_050), "answered after {took:?}");
}

/// Without `non_idempotent`, a POST whose connection was reset after it
/// went out is not sent again: the backend may have acted on it.
#[tokio::test(start_paused = true)]
async fn a_post_the_backend_may_have_seen_is_not_retried() {
    let yaml = two_bots("retry: { attempts: 3, backoff: { base: 1ms, max: 1ms } }");
    let backends = Scripted::new(&[Answer::Reset]);
    let (status, _, _) = exchange(snapshot(&yaml, None), Arc::clone(&backends), post("charge-card")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(backends.backends().len(), 1, "one try only");

    // The same reset on a GET is retried.
    let backends = Scripted::new(&[Answer::Reset]);
    let (status, _, _) = exchange(snapshot(&yaml, None), Arc::clone(&backends), get()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backends.backends().len(), 2);
}

/// A request on a snapshot whose upstream a reload rebuilt (its backends
/// retired) goes on with the rebuilt upstream, without reading the live
/// config: through the link `retire_removed` leaves.
#[tokio::test(start_paused = true)]
async fn a_request_on_a_retired_upstream_goes_on_with_its_successor() {
    let before = snapshot(&two_bots("timeout: 10s"), None);
    let rebuilt = two_bots("timeout: 10s").replace("10.0.0.1:80\" }, { address: \"10.0.0.2:80", "10.0.0.3:80");
    let after = snapshot(&rebuilt, Some(&before));
    before.retire_removed(&after);
    let backends = Scripted::new(&[]);
    let (status, _, _) = exchange(Arc::clone(&before), Arc::clone(&backends), post("job")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backends.backends(), ["10.0.0.3:80"]);
}

/// One bot that runs one job at a time, behind a queue.
fn one_job_bot(route: &str, queue: &str) -> String {
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots, {route} }}]\nupstreams:\n  bots:\n    \
         queue: {queue}\n    backends: [{{ address: \"10.0.0.1:80\", max_concurrency: 1 }}]\n"
    )
}

/// A job that never ends holds the bot until the route's deadline; the job
/// queued behind it gets the bot the moment that frees it, not later.
#[tokio::test(start_paused = true)]
async fn a_queued_job_gets_the_bot_when_the_job_before_it_times_out() {
    let snapshot = snapshot(&one_job_bot("timeout: 10s", "{ timeout: 30s }"), None);
    let backends = Scripted::new(&[Answer::Silent, Answer::Status(200)]);
    let first = tokio::spawn(exchange(Arc::clone(&snapshot), Arc::clone(&backends), post("stuck job")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (second, _, waited) = exchange(snapshot, Arc::clone(&backends), post("next job")).await;
    let (first, _, _) = first.await.unwrap();
    assert_eq!((first, second), (StatusCode::GATEWAY_TIMEOUT, StatusCode::OK));
    let seen = backends.seen.lock().unwrap();
    assert_eq!((seen.len(), &seen[1].body[..]), (2, &b"next job"[..]));
    assert_eq!(seen[1].at.as_millis(), 10_000, "on the bot the moment the first job's deadline freed it");
    assert_eq!(waited.as_millis(), 9_000);
}

/// A queued job that the queue's `timeout` ends gets its 503 (`queue_timeout`)
/// then, not at the route's deadline, and never reaches the bot.
#[tokio::test(start_paused = true)]
async fn a_queued_job_leaves_at_the_queue_timeout() {
    let snapshot = snapshot(&one_job_bot("timeout: 10s", "{ timeout: 3s }"), None);
    let backends = Scripted::new(&[Answer::Silent]);
    let first = tokio::spawn(exchange(Arc::clone(&snapshot), Arc::clone(&backends), post("stuck job")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body, waited) = exchange(snapshot, Arc::clone(&backends), post("next job")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "the backends stayed busy for the whole queue timeout\n");
    assert_eq!(waited.as_millis(), 3_000);
    assert_eq!(backends.seen.lock().unwrap().len(), 1, "only the first job reached the bot");
    first.abort();
}
