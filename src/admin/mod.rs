//! The admin listener: the status page (`/`), `/healthz`, `/readyz`,
//! `/status`, `/metrics`, `/config`, `/explain`, `/reload`, and the
//! per-backend `drain`, `disable` and `enable`; with `admin.token` set, every
//! call but the two probes needs the token (bearer, or as a Basic password for
//! browsers; compared in constant time) or gets 401.
//!
//! A small HTTP/1.1 server on its own socket, separate from the proxy listeners
//! so that operators can always reach it, whatever the proxy's routes say. It
//! holds only a weak reference to the runtime, so it never keeps a stopped proxy
//! alive.
//!
//! A browser must not become an attacker's hand: a state-changing call whose
//! `Origin` is another origin, or whose `Sec-Fetch-Site` says another site
//! sent it, is refused (a web page could otherwise post a form at it, with
//! the browser's Basic credentials attached); on a loopback bind only an IP
//! literal or `localhost` is accepted as `Host` (a DNS-rebinding page would
//! otherwise read and drive it as its own origin). Calls without those
//! headers (curl, scripts) work as before. The listener holds at most
//! [`ADMIN_MAX_CONNECTIONS`] connections (the rest wait in the kernel's
//! backlog, using no descriptor of ours), closes idle ones, HTTP/2
//! included, and lets its connections finish when it stops.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use futures_util::future::BoxFuture;

use crate::backend::AdminState;
use crate::state::{Live, Snapshot};

/// What the admin API needs from the running proxy; `runtime::Runtime`
/// implements it. A trait, so that the admin listener (which the runtime
/// starts) does not depend on the runtime in turn.
pub trait Control: Send + Sync + 'static {
    /// The live snapshot: admin token, effective config, `/explain`, gauges.
    fn live(&self) -> &Live;
    /// Shutting down: `/readyz` answers 503.
    fn is_draining(&self) -> bool;
    /// `GET /status`, rendered with [`render_json`].
    fn status(&self) -> BoxFuture<'_, Vec<u8>>;
    /// `POST /reload`: what changed, rendered with [`render_json`], or why
    /// nothing did.
    fn reload(&self) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// How long an admin client has to send a request head (and, for HTTP/1.1,
/// how long a kept-alive admin connection may sit idle).
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admin connection (HTTP/2 included) may have no request in
/// progress before it is closed.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin connections open at once: far more than operators and scrapers
/// need, far fewer than the descriptors the proxy listeners need.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to finish once asked to close (the
/// listener stops, or it was idle), before it is dropped.
const ADMIN_CLOSE_GRACE: Duration = Duration::from_secs(10);

pub struct AdminHandle {
    pub local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
    /// Tells open connections to finish and close.
    stopping: watch::Sender<bool>,
    /// A duplicate of the listening socket, for a binary upgrade.
    pub socket: Option<std::os::fd::OwnedFd>,
}

impl AdminHandle {
    /// Stops accepting; requests already being served (such as the `/reload`
    /// that moved the admin listener) finish, then their connections close
    /// (within [`ADMIN_CLOSE_GRACE`]).
    pub fn stop(self) {
        self.accept_task.abort();
        let _ = self.stopping.send(true);
    }
}

pub fn spawn(listener: TcpListener, runtime: Weak<dyn Control>) -> std::io::Result<AdminHandle> {
    let local_addr = listener.local_addr()?;
    let socket = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned().ok();
    let (stopping, stopped) = watch::channel(false);
    let places = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let accept_task = tokio::spawn(async move {
        loop {
            // A place first: beyond the cap, connections wait in the
            // kernel's backlog rather than take descriptors of ours.
            let place = Arc::clone(&places).acquire_owned().await.expect("never closed");
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    crate::conn::accept_failed("admin", &error).await;
                    continue;
                }
            };
            tokio::spawn(serve(stream, runtime.clone(), stopped.clone(), place));
        }
    });
    Ok(AdminHandle { local_addr, accept_task, stopping, socket })
}

/// One admin connection, until it ends, idles for [`ADMIN_IDLE_TIMEOUT`], or
/// the listener stops.
async fn serve<S>(
    stream: S,
    runtime: Weak<dyn Control>,
    mut stopped: watch::Receiver<bool>,
    _place: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(AdminActivity::default());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request| {
            let (runtime, activity) = (runtime.clone(), Arc::clone(&activity));
            async move {
                let _busy = activity.busy();
                Ok::<_, Infallible>(answer(runtime, request).await)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and sends nothing (or a head
    // byte by byte) must not hold it open forever.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(ADMIN_HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let closing = loop {
        let idle_for = activity.idle_for();
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stopped.wait_for(|stop| *stop) => break "the admin listener stops",
            () = tokio::time::sleep(ADMIN_IDLE_TIMEOUT.saturating_sub(idle_for.unwrap_or_default())) => {
                if activity.idle_for().is_some_and(|idle| idle >= ADMIN_IDLE_TIMEOUT) {
                    break "idle";
                }
            }
        }
    };
    tracing::debug!(why = closing, "closing an admin connection");
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(ADMIN_CLOSE_GRACE, connection).await;
}

/// Requests in progress on one admin connection, and since when it has had none.
#[derive(Default)]
struct AdminActivity {
    in_progress: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl AdminActivity {
    fn busy(self: &Arc<Self>) -> Busy {
        self.in_progress.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// How long the connection has had no request in progress; `None` while it has one.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_progress.load(std::sync::atomic::Ordering::Acquire) != 0 {
            return None;
        }
        let mut since = self.idle_since.lock().expect("never poisoned");
        Some(since.get_or_insert_with(tokio::time::Instant::now).elapsed())
    }
}

struct Busy(Arc<AdminActivity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("never poisoned") = Some(tokio::time::Instant::now());
        self.0.in_progress.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn answer(runtime: Weak<dyn Control>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(runtime) = runtime.upgrade() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "stopped\n");
    };
    let bind = runtime.live().load().config.admin.bind;
    if let Some(refusal) = refuse_foreign(&request, bind) {
        return refusal;
    }
    // Probes (a kubelet, an L4 balancer) cannot hold a secret, and these two
    // say only "up" and "ready".
    let probe = request.method() == Method::GET && matches!(request.uri().path(), "/healthz" | "/readyz");
    // A scraper that holds no secret (`admin.metrics_without_token`): metrics
    // are read-only, and name only what the config names.
    let open_scrape = request.method() == Method::GET
        && request.uri().path() == "/metrics"
        && runtime.live().load().config.admin.metrics_without_token;
    if let Some(token) = runtime.live().load().admin_token.as_ref().filter(|_| !probe && !open_scrape) {
        if !presents(request.headers(), token) {
            let mut response = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            // A browser asks for the token as a password (any user name) and
            // sends it with the status page's own requests.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer, Basic realm=\"switchyard admin\", charset=\"UTF-8\""),
            );
            return response;
        }
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => {
            let mut response = Response::new(Full::from(STATUS_PAGE));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
            // Its script and data come from here and nowhere else; no inline
            // script runs; no other page may frame it.
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
                     frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                ),
            );
            page_headers(headers);
            response
        }
        (&Method::GET, "/page.js") => {
            let mut response = Response::new(Full::from(STATUS_SCRIPT));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/javascript; charset=utf-8"));
            page_headers(headers);
            response
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if runtime.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/status") => json_response(StatusCode::OK, runtime.status().await),
        (&Method::GET, "/config") => {
            let config = crate::explain::effective_config(&runtime.live().load().config);
            match serde_saphyr::to_string(&config) {
                Ok(yaml) => {
                    let mut response = text(StatusCode::OK, &yaml);
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/yaml"));
                    response
                }
                Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render the config: {error}\n")),
            }
        }
        (&Method::GET, "/explain") => {
            match crate::explain::Described::from_query(request.uri().query().unwrap_or("")) {
                Ok(described) => json(StatusCode::OK, &crate::explain::explain(&runtime.live().load(), &described)),
                Err(error) => text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
            }
        }
        (&Method::GET, "/metrics") => match crate::metrics::install() {
            Some(handle) => {
                // Gauges are read from the live state right before rendering.
                let snapshot = runtime.live().load();
                crate::gauges::refresh_gauges(&snapshot);
                let mut text = handle.render();
                crate::gauges::write_owned_series(&snapshot, &mut text);
                let mut response = Response::new(Full::from(text));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
                response
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed\n"),
        },
        (&Method::POST, "/reload") => match runtime.reload().await {
            Ok(summary) => json_response(StatusCode::OK, summary),
            Err(error) => text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
        },
        (method, path) if path.starts_with("/upstreams/") => {
            if method != Method::POST {
                return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use POST\n");
            }
            backend_action(&runtime.live().load(), path)
        }
        (_, "/healthz" | "/readyz" | "/status" | "/metrics" | "/reload" | "/config" | "/explain") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "unknown admin path\n"),
    }
}

/// The status page: one HTML file and its script (served apart, so that the
/// page's policy allows no inline script), rendering `/status` every two
/// seconds.
const STATUS_PAGE: &str = include_str!("page.html");
const STATUS_SCRIPT: &str = include_str!("page.js");

/// What a browser could be made to send by a page of another origin, refused
/// (see the module's documentation): `Some(403)`, or `None` to go on.
fn refuse_foreign<B>(request: &Request<B>, bind: SocketAddr) -> Option<Response<Full<Bytes>>> {
    let host = match request.headers().get(header::HOST) {
        Some(value) => Some(value.to_str().unwrap_or("\u{fffd}")),
        None => request.uri().authority().map(|authority| authority.as_str()),
    };
    if bind.ip().is_loopback() && host.is_some_and(|host| !is_local_host(host)) {
        return Some(text(StatusCode::FORBIDDEN, "this admin listener answers to an IP address or localhost only\n"));
    }
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    // Sent by browsers with every request: another site's page made this one.
    let site = request.headers().get("sec-fetch-site");
    if site.is_some_and(|site| site == "cross-site" || site == "same-site") {
        return Some(text(StatusCode::FORBIDDEN, "refused: sent by another site's page\n"));
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let own = host.map(|host| format!("http://{host}"));
        if own.as_deref().map(str::as_bytes) != Some(origin.as_bytes()) {
            return Some(text(StatusCode::FORBIDDEN, "refused: sent from another origin\n"));
        }
    }
    None
}

/// `localhost` or an IP literal, with or without a port: the only names a
/// loopback admin answers to. Any other name could be an attacker's, made to
/// resolve to 127.0.0.1 (DNS rebinding).
fn is_local_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        let Some((address, port)) = rest.split_once(']') else { return false };
        return address.parse::<std::net::Ipv6Addr>().is_ok()
            && (port.is_empty() || port.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok()));
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Whether the request carries the admin token: `Authorization: Bearer TOKEN`,
/// or HTTP Basic with the token as the password (what a browser sends).
fn presents(headers: &http::HeaderMap, token: &crate::config::Secret) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else {
        return false;
    };
    if let Some(bearer) = value.strip_prefix(b"Bearer ") {
        return token.matches(bearer);
    }
    let Some(basic) = value.strip_prefix(b"Basic ") else {
        return false;
    };
    use base64::Engine as _;
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim_ascii()) else {
        return false;
    };
    let password = decoded.iter().position(|&b| b == b':').map_or(&[][..], |colon| &decoded[colon + 1..]);
    token.matches(password)
}

/// `POST /upstreams/{name}/backends/{address}/{drain|disable|enable}`: sets
/// the operator's override on one backend of one upstream. It lives in the
/// backend's state, so it lasts while the backend stays in the config.
fn backend_action(snapshot: &Snapshot, path: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["upstreams", upstream, "backends", address, action] = parts[..] else {
        return text(StatusCode::NOT_FOUND, "expected /upstreams/{name}/backends/{address}/{drain|disable|enable}\n");
    };
    let (upstream, address) = (percent_decoded(upstream), percent_decoded(address));
    let state = match action {
        "drain" => AdminState::Draining,
        "disable" => AdminState::Disabled,
        "enable" => AdminState::Enabled,
        _ => return text(StatusCode::NOT_FOUND, &format!("unknown action `{action}`: drain, disable or enable\n")),
    };
    let Some(found) = snapshot.upstreams.iter().find(|u| *u.name == upstream) else {
        return text(StatusCode::NOT_FOUND, &format!("no upstream `{upstream}`\n"));
    };
    let Some(backend) = found.backends.iter().find(|b| *b.address == address) else {
        return text(StatusCode::NOT_FOUND, &format!("upstream `{upstream}` has no backend `{address}`\n"));
    };
    let before = backend.state.admin();
    backend.state.set_admin(state);
    if state == AdminState::Enabled {
        // Waiters may take it at once rather than at the next housekeeping tick.
        if let Some(queue) = &found.queue {
            queue.slot_freed();
        }
    }
    tracing::info!(upstream, backend = address, ?before, after = ?state, "backend override set by the admin API");
    let in_flight = backend.in_flight();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "upstream": upstream,
            "backend": address,
            "admin_state": state,
            "in_flight": in_flight,
            "drained": (state == AdminState::Draining).then_some(in_flight == 0),
        }),
    )
}

/// A path segment with `%XX` escapes decoded (an IPv6 address's brackets);
/// undecodable input is kept as written, and then names nothing.
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_owned())
}

/// What the status page and its script are served with: never cached, never
/// taken for another type, never framed.
fn page_headers(headers: &mut http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// How every admin answer in JSON is written: pretty, with a final newline.
pub fn render_json(value: &impl serde::Serialize) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    body
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    json_response(status, render_json(value))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(method: Method, bind: &str, headers: &[(&str, &str)]) -> u16 {
        let mut request = Request::builder().method(method).uri("/reload");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).unwrap();
        refuse_foreign(&request, bind.parse().unwrap()).map_or(200, |r| r.status().as_u16())
    }

    /// A proxy that has stopped: every call answers `503 stopped` without
    /// reaching it, which is all the connection tests below ask of it.
    struct Stopped;

    impl Control for Stopped {
        fn live(&self) -> &Live {
            unreachable!("a stopped proxy is never reached")
        }
        fn is_draining(&self) -> bool {
            unreachable!("a stopped proxy is never reached")
        }
        fn status(&self) -> BoxFuture<'_, Vec<u8>> {
            unreachable!("a stopped proxy is never reached")
        }
        fn reload(&self) -> BoxFuture<'_, Result<Vec<u8>, String>> {
            unreachable!("a stopped proxy is never reached")
        }
    }

    /// One admin connection served over an in-memory pipe: the client's end,
    /// and the listener's stop signal (kept, or the connection closes at once).
    fn admin_connection() -> (tokio::io::DuplexStream, watch::Sender<bool>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop, stopped) = watch::channel(false);
        let place = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        tokio::spawn(serve(server, Weak::<Stopped>::new(), stopped, place));
        (client, stop)
    }

    /// Runs `test` on paused time, failing rather than hanging when it does
    /// not end: within ten minutes of paused time (a connection that is
    /// never closed, while timers go on firing), and within a minute of real
    /// time (code that spins on a zero-length sleep never lets paused time
    /// advance).
    fn on_paused_time<F: std::future::Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(600), test()).await.expect("ended within 10 minutes")
            });
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test failed: see its panic above"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("paused time stopped advancing (a busy loop?)"),
        }
    }

    #[test]
    fn a_head_that_never_completes_is_closed_at_the_header_read_timeout() {
        on_paused_time(|| async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, _stop) = admin_connection();
            let started = tokio::time::Instant::now();
            client.write_all(b"GET /status HTTP/1.1\r\n").await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            let took = started.elapsed();
            let limit = ADMIN_HEADER_READ_TIMEOUT;
            assert!(took >= limit && took < limit + Duration::from_secs(1), "closed after {took:?}");
        });
    }

    /// An HTTP/2 client that answers the admin's PINGs but asks nothing
    /// more is let go after `ADMIN_IDLE_TIMEOUT`.
    #[test]
    fn an_http2_connection_with_no_request_is_closed_after_the_idle_timeout() {
        on_paused_time(|| async {
            let (client, _stop) = admin_connection();
            let (h2, connection) = h2::client::handshake(client).await.unwrap();
            let connection = tokio::spawn(connection);
            let mut h2 = h2.ready().await.unwrap();
            let request = Request::get("http://127.0.0.1/healthz").body(()).unwrap();
            let (answer, _) = h2.send_request(request, true).unwrap();
            assert_eq!(answer.await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE, "a stopped proxy's answer");
            let answered = tokio::time::Instant::now();
            let _open = h2;
            connection.await.unwrap().unwrap();
            let idle = answered.elapsed();
            let limit = ADMIN_IDLE_TIMEOUT;
            assert!(idle >= limit && idle < limit + Duration::from_secs(1), "closed after {idle:?}");
        });
    }

    #[test]
    fn a_loopback_admin_answers_only_to_local_names() {
        let loopback = "127.0.0.1:9901";
        for host in ["127.0.0.1:9901", "localhost:9901", "LOCALHOST", "[::1]:9901", "[::1]", "10.0.0.1"] {
            assert_eq!(verdict(Method::GET, loopback, &[("host", host)]), 200, "{host}");
        }
        for host in ["rebind.evil.example:9901", "evil.example", "127.0.0.1.nip.io:9901", "[::1]x", "localhost:x"] {
            assert_eq!(verdict(Method::GET, loopback, &[("host", host)]), 403, "{host}");
        }
        // On a public bind (which needs a token) names are the operator's.
        assert_eq!(verdict(Method::GET, "0.0.0.0:9901", &[("host", "admin.bots.internal:9901")]), 200);
    }

    #[test]
    fn a_state_change_from_another_origin_or_site_is_refused() {
        let local = ("host", "127.0.0.1:9901");
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local]), 200, "curl sends neither");
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("origin", "http://127.0.0.1:9901")]), 200);
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("sec-fetch-site", "same-origin")]), 200);
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("origin", "https://evil.example")]), 403);
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("origin", "null")]), 403);
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("sec-fetch-site", "cross-site")]), 403);
        assert_eq!(verdict(Method::POST, "127.0.0.1:9901", &[local, ("sec-fetch-site", "same-site")]), 403);
        assert_eq!(
            verdict(Method::GET, "127.0.0.1:9901", &[local, ("sec-fetch-site", "cross-site")]),
            200,
            "reads are not state changes"
        );
    }
}
