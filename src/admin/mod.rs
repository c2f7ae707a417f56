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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Weak;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
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
pub const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AdminHandle {
    pub local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
    /// A duplicate of the listening socket, for a binary upgrade.
    pub socket: Option<std::os::fd::OwnedFd>,
}

impl AdminHandle {
    /// Stops accepting; requests already being served (such as the `/reload`
    /// that moved the admin listener) finish on their own.
    pub fn stop(self) {
        self.accept_task.abort();
    }
}

pub fn spawn(listener: TcpListener, runtime: Weak<dyn Control>) -> std::io::Result<AdminHandle> {
    let local_addr = listener.local_addr()?;
    let socket = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned().ok();
    let accept_task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    crate::server::accept_failed("admin", &error).await;
                    continue;
                }
            };
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let runtime = runtime.clone();
                    async move { Ok::<_, Infallible>(answer(runtime, request).await) }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // A client that opens a connection and sends nothing (or a head
                // byte by byte) must not hold it open forever.
                builder.http1().timer(TokioTimer::new()).header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
                builder.http2().timer(TokioTimer::new()).keep_alive_interval(ADMIN_HEADER_READ_TIMEOUT);
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(AdminHandle { local_addr, accept_task, socket })
}

async fn answer(runtime: Weak<dyn Control>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(runtime) = runtime.upgrade() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "stopped\n");
    };
    // Probes (a kubelet, an L4 balancer) cannot hold a secret, and these two
    // say only "up" and "ready".
    let probe = request.method() == Method::GET && matches!(request.uri().path(), "/healthz" | "/readyz");
    if let Some(token) = runtime.live().load().admin_token.as_ref().filter(|_| !probe) {
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
            // Everything the page needs is in it: no other origin is ever asked.
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            );
            headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
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
                crate::gauges::refresh_gauges(&runtime.live().load());
                let mut response = Response::new(Full::from(handle.render()));
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

/// The status page: one self-contained HTML file that renders `/status`
/// every two seconds.
const STATUS_PAGE: &str = include_str!("page.html");

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
