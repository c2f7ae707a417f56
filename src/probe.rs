//! Active health checks: one checker task per (backend address, check, TLS
//! setting), probing on an interval with jitter, feeding a shared
//! [`CheckStatus`]. A TLS upstream's backends are checked over TLS, with the
//! upstream's CA, client certificate and server name.
//!
//! [`Checkers`] reconciles the running checkers with each new snapshot: checks
//! that appear start, checks that disappear stop, checks that stay keep running
//! (and keep their status), and two upstreams listing the same backend with the
//! same check share one checker. Probes go through the checkers' own
//! clients (see [`Prober`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, Request};
use http_body_util::{BodyExt, Limited};
use tokio::task::JoinHandle;

use crate::backend::BackendState;
use crate::client::{Destination, SendError, UpstreamClients};
use crate::config::tls::UpstreamTls;
use crate::config::{ActiveCheck, Probe};
use crate::health::{describe, CheckStatus, Transition};
use crate::state::Snapshot;

/// A health check response body is read up to this size when `expect_body` is set.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// Backend address, check, and the upstream's TLS setting (by fingerprint).
type Key = (Arc<str>, ActiveCheck, Option<u64>);

/// A check a snapshot needs: its status, the upstreams listing it (with the
/// backend's state in each), its TLS.
type Wanted = (Arc<CheckStatus>, CheckCounters, Option<UpstreamTls>);

struct Checker {
    status: Arc<CheckStatus>,
    /// Counters for each upstream listing this backend with this check; replaced
    /// when that list changes.
    counters: Arc<Mutex<Arc<CheckCounters>>>,
    task: JoinHandle<()>,
}

/// Where a checker counts its probes (`switchyard_health_checks_total`): the
/// state of its backend in each upstream listing it.
#[derive(Default)]
struct CheckCounters {
    upstreams: Vec<Arc<str>>,
    states: Vec<Arc<BackendState>>,
}

impl CheckCounters {
    fn same_as(&self, other: &CheckCounters) -> bool {
        self.upstreams == other.upstreams && self.states.iter().zip(&other.states).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The running checkers of one proxy. They run on a thread of their own, so
/// request load never delays a check, checks never take a request worker, and
/// the thread can sleep between batches (see `BATCH_STEP`).
#[derive(Default)]
pub struct Checkers {
    running: HashMap<Key, Checker>,
    thread: Option<CheckerThread>,
}

struct CheckerThread {
    handle: tokio::runtime::Handle,
    /// The checkers' connector and pools, apart from the workers'.
    clients: Arc<UpstreamClients>,
    /// Dropping it ends the thread's runtime, and every checker with it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl CheckerThread {
    fn start(connect_timeout: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("can start the health check runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("health-checks".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .expect("can start the health check thread");
        CheckerThread { handle, clients: Arc::new(UpstreamClients::new(connect_timeout)), _stop: stop }
    }
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for checker in self.running.values() {
            checker.task.abort();
        }
    }
}

impl Checkers {
    /// Checkers on the test's own runtime rather than a thread of their own,
    /// so that they run on its paused clock.
    #[cfg(test)]
    fn on_current_runtime() -> Self {
        let thread = CheckerThread {
            handle: tokio::runtime::Handle::current(),
            clients: Arc::new(UpstreamClients::new(Duration::from_secs(5))),
            _stop: tokio::sync::oneshot::channel().0,
        };
        Checkers { running: HashMap::new(), thread: Some(thread) }
    }

    /// Makes the running checkers exactly those `snapshot` needs.
    pub fn sync(&mut self, snapshot: &Snapshot) {
        if let Some(thread) = &self.thread {
            thread.clients.set_connect_timeout(snapshot.limits.connect_timeout);
        }
        let mut wanted: HashMap<Key, Wanted> = HashMap::new();
        for upstream in &snapshot.upstreams {
            let Some(check) = &upstream.config.health.active else { continue };
            let tls = &upstream.config.tls;
            for backend in &upstream.backends {
                let status = backend.check.as_ref().expect("backends of a checked upstream have a status");
                let entry = wanted
                    .entry((Arc::clone(&backend.address), check.clone(), tls.as_ref().map(|t| t.fingerprint)))
                    .or_insert_with(|| (Arc::clone(status), CheckCounters::default(), tls.clone()));
                entry.1.upstreams.push(Arc::clone(&upstream.name));
                entry.1.states.push(Arc::clone(&backend.state));
            }
        }
        self.running.retain(|key, checker| {
            let keep = wanted.get(key).is_some_and(|(status, _, _)| Arc::ptr_eq(status, &checker.status));
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (key, (status, wanted_counters, tls)) in wanted {
            if let Some(checker) = self.running.get(&key) {
                let mut counters = checker.counters.lock().expect("never poisoned");
                if !counters.same_as(&wanted_counters) {
                    *counters = Arc::new(wanted_counters);
                }
                continue;
            }
            let counters = Arc::new(Mutex::new(Arc::new(wanted_counters)));
            let thread = self.thread.get_or_insert_with(|| CheckerThread::start(snapshot.limits.connect_timeout));
            let prober = Prober::new(Arc::clone(&thread.clients), &key.0, &key.1.probe, tls.as_ref());
            let task = thread.handle.spawn(run(
                prober,
                key.0.clone(),
                key.1.clone(),
                Arc::clone(&status),
                Arc::clone(&counters),
            ));
            self.running.insert(key, Checker { status, counters, task });
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

async fn run(
    mut prober: Prober,
    address: Arc<str>,
    check: ActiveCheck,
    status: Arc<CheckStatus>,
    counters: Arc<Mutex<Arc<CheckCounters>>>,
) {
    // Spread the first probes of many backends over one interval instead of
    // probing them all at the same instant.
    tokio::time::sleep_until(batched(
        tokio::time::Instant::now() + check.interval.mul_f64(fastrand::f64()),
        check.interval,
    ))
    .await;
    loop {
        let (passed, reason) = match tokio::time::timeout(check.timeout, prober.probe(&check.probe)).await {
            Ok(Ok(reason)) => (true, reason),
            Ok(Err(reason)) => (false, reason),
            Err(_) => (false, format!("timeout after {}", describe(check.timeout))),
        };
        if !passed {
            // Whatever state the connection is in, the next probe starts afresh.
            prober.disconnect();
        }
        let counters = Arc::clone(&counters.lock().expect("never poisoned"));
        for state in &counters.states {
            state.series.checked(passed);
        }
        match status.record(passed, reason, check.healthy_after, check.unhealthy_after) {
            Transition::BecameUnhealthy => {
                let reason = status.last().map(|l| l.reason).unwrap_or_default();
                tracing::warn!(backend = %address, upstreams = ?counters.upstreams, %reason, "backend is unhealthy")
            }
            Transition::BecameHealthy => {
                tracing::info!(backend = %address, upstreams = ?counters.upstreams, "backend is healthy again")
            }
            Transition::None => {}
        }
        // Up to 10% jitter so checkers started together drift apart; half a batch
        // step earlier, as batching rounds deadlines up.
        let next =
            check.interval.mul_f64(0.9 + 0.2 * fastrand::f64()).saturating_sub(BATCH_STEP.min(check.interval / 4) / 2);
        tokio::time::sleep_until(batched(tokio::time::Instant::now() + next, check.interval)).await;
    }
}

/// Checks fire on a grid of this step, so that the checker thread wakes once per
/// step for a batch of probes instead of once per probe: with a thousand
/// backends, waking is most of the cost of checking.
const BATCH_STEP: Duration = Duration::from_millis(250);

/// Rounds `deadline` up to the batch grid; short intervals get a finer grid
/// (a quarter of the interval) so they keep their rhythm.
fn batched(deadline: tokio::time::Instant, interval: Duration) -> tokio::time::Instant {
    static GRID: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let grid = *GRID.get_or_init(tokio::time::Instant::now);
    let offset = deadline.saturating_duration_since(grid).as_nanos();
    let step = BATCH_STEP.min(interval / 4).as_nanos().max(1);
    grid + Duration::from_nanos((offset.div_ceil(step) * step) as u64)
}

/// Probes one backend through the checkers' own clients, whose pools keep
/// its HTTP or HTTP/2 connection open between probes (as Envoy does), so a
/// check costs a request, not a TCP handshake; they are not the workers'
/// pools, so a check never rides on (or keeps alive) a request's
/// connection. A failed probe lets go of the connection, so a dead or
/// restarted backend is always probed on a fresh one.
pub struct Prober {
    clients: Arc<UpstreamClients>,
    authority: Result<http::uri::Authority, String>,
    /// The connections' key in the checkers' pools.
    key: Arc<str>,
    /// TLS as the upstream has it, with ALPN for the check's protocol.
    tls: Option<UpstreamTls>,
    /// The HTTP check's target and `Host`, validated once.
    request: Option<(http::uri::PathAndQuery, http::HeaderValue)>,
}

impl Prober {
    pub fn new(clients: Arc<UpstreamClients>, address: &Arc<str>, probe: &Probe, tls: Option<&UpstreamTls>) -> Self {
        let tls = tls.map(|tls| {
            let mut config = (*tls.client_config).clone();
            config.alpn_protocols = match probe {
                Probe::Grpc { .. } => vec![b"h2".to_vec()],
                _ => vec![b"http/1.1".to_vec()],
            };
            UpstreamTls { client_config: Arc::new(config), ..tls.clone() }
        });
        let request = match probe {
            Probe::Http { path, host, .. } => {
                // Validated config: path starts with `/`, host is a valid header value.
                let target = path.parse::<http::uri::PathAndQuery>().ok();
                let host = http::HeaderValue::from_str(host.as_deref().unwrap_or(address)).ok();
                target.zip(host)
            }
            _ => None,
        };
        Prober {
            authority: address.parse().map_err(|e| format!("not an address: {e}")),
            key: crate::backend::pool_key(address, tls.as_ref()),
            clients,
            tls,
            request,
        }
    }

    /// Lets go of the connections kept for this backend.
    pub fn disconnect(&mut self) {
        self.clients.http1().forget(&self.key);
        self.clients.h2().forget(&self.key);
    }

    fn destination(&self) -> Result<Destination<'_>, String> {
        let authority = self.authority.as_ref().map_err(Clone::clone)?;
        Ok(Destination { key: &self.key, authority, tls: self.tls.as_ref() })
    }

    /// One probe: `Ok(reason)` if it passed, `Err(reason)` if not.
    pub async fn probe(&mut self, probe: &Probe) -> Result<String, String> {
        match probe {
            // With TLS, a TCP check passes on a completed handshake.
            Probe::Tcp => {
                let to = self.destination()?;
                match self.clients.connector().connect(to.authority, to.tls).await {
                    Ok(_) => Ok("connected".to_owned()),
                    Err(error) => Err(error.to_string()),
                }
            }
            Probe::Http { expect_status, expect_body, .. } => {
                self.http_probe(expect_status, expect_body.as_deref()).await
            }
            Probe::Grpc { service } => self.grpc_probe(service).await,
        }
    }

    async fn http_probe(&mut self, expect_status: &[u16], expect_body: Option<&str>) -> Result<String, String> {
        let reused = self.clients.http1().has_idle(&self.key);
        match self.http_exchange(expect_status, expect_body).await {
            // A kept-alive connection may have died since the last probe in a
            // way only a request reveals; one retry on a fresh connection tells a
            // dead connection from a dead backend.
            Err(Exchange::Transport(_)) if reused => {
                self.disconnect();
                self.http_exchange(expect_status, expect_body).await.map_err(Exchange::into_reason)
            }
            other => other.map_err(Exchange::into_reason),
        }
    }

    /// One `GET` on the kept-alive connection (opened if needed), through
    /// the proxy's own HTTP/1.1 client: interim (1xx) responses, chunked
    /// bodies and connection reuse are handled as for proxied requests.
    async fn http_exchange(&self, expect_status: &[u16], expect_body: Option<&str>) -> Result<String, Exchange> {
        let (target, host) =
            self.request.clone().ok_or_else(|| Exchange::Check("check path is not a valid request target".into()))?;
        let to = self.destination().map_err(Exchange::Refused)?;
        let request = Request::get(http::Uri::from(target))
            .header(header::HOST, host)
            .header(header::USER_AGENT, "switchyard-health-check")
            .body(crate::body::empty())
            .map_err(|e| Exchange::Check(e.to_string()))?;
        let response = match self.clients.http1().send(to, request).await {
            Ok(response) => response,
            Err(SendError::Connect(error)) => return Err(Exchange::Refused(error.to_string())),
            Err(SendError::Request(error)) => return Err(Exchange::Transport(error.to_string())),
        };
        let status = response.status().as_u16();
        // Read the body whole (bounded), so the connection goes back to the
        // pool for the next probe; one too long for that is let go with its
        // connection.
        let body = match Limited::new(response.into_body(), MAX_CHECK_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                if expect_body.is_some() {
                    return Err(Exchange::Check(format!("status {status}, reading the body failed: {error}")));
                }
                Bytes::new()
            }
        };
        if !expect_status.contains(&status) {
            return Err(Exchange::Check(format!("status {status}")));
        }
        if let Some(wanted) = expect_body {
            if !String::from_utf8_lossy(&body).contains(wanted) {
                return Err(Exchange::Check(format!("status {status}, body does not contain `{wanted}`")));
            }
        }
        Ok(format!("status {status}"))
    }

    /// `grpc.health.v1.Health/Check` over HTTP/2 (h2c, or over TLS). The two messages are tiny, so they
    /// are encoded by hand: `HealthCheckRequest { string service = 1; }` and
    /// `HealthCheckResponse { ServingStatus status = 1; }` with SERVING = 1.
    async fn grpc_probe(&self, service: &str) -> Result<String, String> {
        let to = self.destination()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let request = Request::post(format!("{scheme}://{}/grpc.health.v1.Health/Check", to.authority))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .header(header::USER_AGENT, "switchyard-health-check")
            .body(crate::body::full(grpc_request(service)))
            .map_err(|e| e.to_string())?;
        let response = match self.clients.h2().send(to, request).await {
            Ok(response) => response,
            Err(SendError::Connect(error)) => return Err(error.to_string()),
            Err(SendError::Request(error)) => return Err(error.to_string()),
        };
        if response.status() != http::StatusCode::OK {
            return Err(format!("status {}", response.status().as_u16()));
        }
        let headers = response.headers().clone();
        let collected = Limited::new(response.into_body(), MAX_CHECK_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?;
        // A trailers-only response carries grpc-status in the headers.
        let trailers = collected.trailers().cloned().unwrap_or(headers);
        let grpc_status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("missing");
        if grpc_status != "0" {
            let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
            return Err(format!("grpc-status {grpc_status} {message}").trim_end().to_owned());
        }
        match grpc_serving_status(collected.to_bytes()) {
            Some(1) => Ok("SERVING".to_owned()),
            Some(2) => Err("NOT_SERVING".to_owned()),
            Some(3) => Err("SERVICE_UNKNOWN".to_owned()),
            Some(0) => Err("UNKNOWN".to_owned()),
            Some(other) => Err(format!("serving status {other}")),
            None => Err("malformed health response".to_owned()),
        }
    }
}

/// How an HTTP probe failed: the distinction decides whether a retry on a fresh
/// connection is worth it.
enum Exchange {
    /// Could not connect: the backend is down; no retry.
    Refused(String),
    /// The connection failed mid-exchange: maybe only that connection.
    Transport(String),
    /// The backend answered, wrongly.
    Check(String),
}

impl Exchange {
    fn into_reason(self) -> String {
        match self {
            Exchange::Refused(reason) | Exchange::Transport(reason) | Exchange::Check(reason) => reason,
        }
    }
}

/// A gRPC length-prefixed message holding `HealthCheckRequest { service }`.
fn grpc_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        push_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(bytes: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !bytes.has_remaining() {
            return None;
        }
        let byte = bytes.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The `status` field of a framed `HealthCheckResponse`; 0 (UNKNOWN) if absent,
/// as protobuf omits default values.
fn grpc_serving_status(mut frame: Bytes) -> Option<u64> {
    if frame.len() < 5 || frame[0] != 0 {
        return None;
    }
    frame.advance(1);
    let length = frame.get_u32() as usize;
    if frame.len() < length {
        return None;
    }
    let mut message = frame.split_to(length);
    let mut status = 0;
    while message.has_remaining() {
        let tag = read_varint(&mut message)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = read_varint(&mut message)?,
            (_, 0) => {
                read_varint(&mut message)?;
            }
            (_, 2) => {
                let skip = read_varint(&mut message)? as usize;
                if message.len() < skip {
                    return None;
                }
                message.advance(skip);
            }
            (_, 1) if message.len() >= 8 => message.advance(8),
            (_, 5) if message.len() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_round_trip() {
        assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&grpc_request("ab")[..], &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])), Some(1));
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Some(0));
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 4, 0x12, 1, b'x', 0x08])), None);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[1, 0, 0, 0, 0])), None);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])), None);
    }

    /// A real HTTP/1.1 backend answering every request with the status in
    /// `status`; counts the connections it accepts.
    async fn counting_backend(
        status: Arc<std::sync::atomic::AtomicU16>,
    ) -> (Arc<str>, Arc<std::sync::atomic::AtomicUsize>) {
        crate::client::test_server::counting(move |tcp| {
            let status = Arc::clone(&status);
            async move {
                let service = hyper::service::service_fn(move |_request| {
                    let status = status.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let mut response = http::Response::new(http_body_util::Full::new(Bytes::from("ok")));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn http_probes_keep_their_connection_until_one_fails() {
        use std::sync::atomic::{AtomicU16, Ordering};
        let status = Arc::new(AtomicU16::new(200));
        let (address, accepted) = counting_backend(Arc::clone(&status)).await;
        let check = Probe::Http { path: "/health".into(), expect_status: vec![200], host: None, expect_body: None };
        let clients = Arc::new(UpstreamClients::new(Duration::from_secs(5)));
        let mut prober = Prober::new(Arc::clone(&clients), &address, &check, None);
        for _ in 0..3 {
            assert_eq!(prober.probe(&check).await, Ok("status 200".to_owned()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "three probes, one connection");
        status.store(503, Ordering::SeqCst);
        assert_eq!(prober.probe(&check).await, Err("status 503".to_owned()));
        // As `run` does after a failed probe.
        prober.disconnect();
        status.store(200, Ordering::SeqCst);
        assert_eq!(prober.probe(&check).await, Ok("status 200".to_owned()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "after a failure, a fresh connection");
    }

    /// A reload's `limits.connect_timeout` bounds the checks' connects too,
    /// not only the requests': one connector serves both. A listener whose
    /// accept queue is full leaves new connections unanswered.
    #[tokio::test]
    async fn checks_connect_within_the_connect_timeout_in_force() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        socket.listen(0).unwrap();
        let silent = socket.local_addr().unwrap().as_socket().unwrap();
        let mut held = Vec::new();
        while let Ok(connected) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(silent)).await
        {
            held.push(connected.unwrap());
            assert!(held.len() < 64, "the accept queue never filled");
        }
        let yaml = format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nlimits: {{ connect_timeout: 250ms }}\nroutes: [{{ upstream: bots }}]\n\
             upstreams:\n  bots:\n    health: {{ active: {{ kind: tcp, interval: 2s, timeout: 2s }} }}\n    \
             backends: [{{ address: \"{silent}\" }}]\n"
        );
        let config = crate::config::parse(&yaml, "test.yaml").unwrap();
        let snapshot = Arc::new(Snapshot::compile(&config, None, 1));
        let status = Arc::clone(snapshot.upstreams[0].backends[0].check.as_ref().unwrap());
        let mut checkers = Checkers::on_current_runtime();
        checkers.sync(&snapshot);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let last = loop {
            if let Some(last) = status.last() {
                break last;
            }
            assert!(tokio::time::Instant::now() < deadline, "no check within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!last.passed);
        assert_eq!(last.reason, "no connection within 250ms (limits.connect_timeout)");
    }

    /// The health thresholds on paused time: a backend that refuses
    /// connections goes down after `unhealthy_after` failed checks, that is
    /// between two and three intervals after the first one (which lands
    /// anywhere in the first interval), with the interval's jitter.
    #[tokio::test(start_paused = true)]
    async fn unhealthy_after_consecutive_failed_checks_on_paused_time() {
        // A port nothing listens on: every check fails at once, connection refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let yaml = format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    \
             health: {{ active: {{ kind: tcp, interval: 10s, timeout: 1s, unhealthy_after: 3 }} }}\n    \
             backends: [{{ address: \"{closed}\" }}]\n"
        );
        let config = crate::config::parse(&yaml, "test.yaml").unwrap();
        let snapshot = Arc::new(Snapshot::compile(&config, None, 1));
        let bot = Arc::clone(&snapshot.upstreams[0].backends[0]);
        let mut checkers = Checkers::on_current_runtime();
        checkers.sync(&snapshot);
        let started = tokio::time::Instant::now();
        let mut went_down = None;
        while went_down.is_none() && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !bot.is_healthy_now() {
                went_down = Some(started.elapsed());
            }
        }
        let went_down = went_down.expect("down within 60 s of paused time");
        assert!(
            went_down >= Duration::from_secs(17) && went_down <= Duration::from_secs(34),
            "three checks 9-11 s apart, the first within the first 10 s: down after {went_down:?}"
        );
        // Refused, as a rule; a connect whose refusal the kernel is slow to
        // report meets the paused clock's timeout instead, a failure all the same.
        assert!(!bot.check.as_ref().unwrap().last().unwrap().passed);
    }
}
