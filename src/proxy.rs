//! The innermost service: pick a backend, rewrite the request, forward it, and
//! stream the response back.
//!
//! Reads top to bottom as one function, `forward`, with a comment per step.
//! Bodies are never buffered: the request body streams to the backend through a
//! size limit, the response body streams back holding the backend's in-flight slot
//! until its last byte. `Upgrade` requests (WebSocket) become a byte tunnel after
//! the backend answers 101.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::backend::InFlightGuard;
use crate::balance::{Pick, PickRequest};
use crate::body::{ClientBody, ClientBodyError, ClientBodyTimeout, Guarded, ProxyBody};
use crate::client::{SendError, Upgraded, UpstreamBody, UpstreamClients};
use crate::config::{RetryOn, UpstreamProtocol};
use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::observe::{NotedRequest, RequestNotes};
use crate::queue::Priority;
use crate::retry;
use crate::state::WorkerLive;
use crate::upstream::{Unavailable, Upstream};

#[derive(Clone, Debug)]
pub struct Forward {
    clients: Arc<UpstreamClients>,
    /// For a request that outlives its snapshot's backends (see `reroute`).
    live: WorkerLive,
}

impl Forward {
    pub fn new(clients: Arc<UpstreamClients>, live: WorkerLive) -> Self {
        Forward { clients, live }
    }
}

type ForwardFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl tower::Service<NotedRequest> for Forward {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: NotedRequest) -> ForwardFuture {
        // The rewriting before the first await runs here, outside the future:
        // what it needs on the way (the original request) is then not kept
        // in the future, which is boxed and moved for every request.
        match Prepared::new(request) {
            Ok(prepared) => Box::pin(forward(Arc::clone(&self.clients), Arc::clone(&self.live), prepared)),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Request bodies up to this size are kept in memory so that a retry can send
/// them again; larger or unsized (chunked) bodies stream, and are not retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A request rewritten for backends (steps 1 and 2 of `forward`), with what
/// the tries need from the client's side.
struct Prepared {
    notes: Arc<RequestNotes>,
    conn: Arc<ConnInfo>,
    /// Method, target and headers every try starts from; the last try takes it.
    template: Option<http::request::Parts>,
    body: Option<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    original_host: Option<HeaderValue>,
}

impl Prepared {
    fn new(noted: NotedRequest) -> Result<Prepared, ProxyError> {
        let NotedRequest { mut request, notes } = noted;
        let (snapshot, _) = notes.route().expect("the route layer runs first");
        let conn = Arc::clone(notes.conn().expect("the listener attaches the connection"));

        // 1. Refuse a body that declares itself too large before touching a backend.
        let limit = snapshot.limits.max_body_bytes;
        if content_length(request.headers()).is_some_and(|length| length > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }

        // 2. Rewrite what is the same for every try: forwarding headers, no hop-by-hop.
        let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut template, body) = request.into_parts();
        let original_host = template
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| template.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        strip_hop_by_hop(&mut template.headers, client_upgrade.is_some());
        add_forwarding_headers(&mut template.headers, &conn, original_host.as_ref());
        Ok(Prepared { notes, conn, template: Some(template), body: Some(body), client_upgrade, original_host })
    }
}

/// One try's request: a copy of the template, or the template itself for the
/// last try, in the form the backend takes.
fn next_try(
    template: &mut Option<http::request::Parts>,
    last: bool,
    upstream: &Upstream,
    backend: &crate::backend::Backend,
    original_host: Option<&HeaderValue>,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, ProxyError> {
    let parts = if last {
        template.take().expect("present until the last try")
    } else {
        clone_parts(template.as_ref().expect("present until the last try"))
    };
    let parts = for_backend(parts, upstream, backend, original_host)?;
    Ok(Request::from_parts(parts, body))
}

// Not an `async fn`: its arguments would be copied into the future next to
// their originals; the `async move` block uses `prepared`'s fields in place.
#[allow(clippy::manual_async_fn)]
fn forward(
    clients: Arc<UpstreamClients>,
    live: WorkerLive,
    mut prepared: Prepared,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send {
    async move {
        let (snapshot, index) = prepared.notes.route().expect("the route layer runs first");
        let route = &snapshot.router.routes()[index];
        // The upstream tries go to; a reload can replace it under a waiting request.
        let mut upstream = Arc::clone(&route.upstream);
        let mut reroutes = 0;
        let limits = &snapshot.limits;
        let limit = limits.max_body_bytes;
        // One deadline for the whole exchange up to the response head: queueing,
        // every try and every backoff. Each try's timer is cut to it, so a timeout
        // is one event, seen by the try it ends and charged to that try's backend.
        let deadline = tokio::time::Instant::now() + route.timeout;

        // 3. Whether this request can be retried: a retry policy, no upgrade, and a
        //    body small enough to keep for replay.
        let policy = route.retry.as_ref().filter(|_| prepared.client_upgrade.is_none());
        let client_body = ClientBody::new(prepared.body.take().expect("taken once"), limits.client_body_timeout);
        let mut body = match policy {
            // Boxed: collecting a body is rare, and would make every request's future larger.
            Some(_) => Box::pin(RequestBody::replayable(client_body, deadline)).await?,
            None => RequestBody::streaming(client_body),
        };
        let attempts = match (policy, &body) {
            (Some(policy), RequestBody::Replay(_)) => policy.config.attempts,
            _ => 1,
        };
        if let Some(policy) = policy {
            policy.budget.record_request();
        }

        let mut tried: Vec<usize> = Vec::new();
        // The last try's answer, given to the client if no further try can start.
        let mut previous: Option<Result<Response<ProxyBody>, ProxyError>> = None;
        let mut attempts_made = 0u32;
        loop {
            let attempt = attempts_made + 1;
            let last = attempt >= attempts;

            // 4. Pick a backend (waiting in the upstream's queue when every one is
            //    busy); the pick reserves its in-flight slot. A request that waited
            //    through a reload which replaced its upstream (its old backends are
            //    retired) goes on with the new one.
            let template = prepared.template.as_ref().expect("kept until the last try");
            let picked = pick_backend(&upstream, template, &prepared.conn, &tried, deadline, &prepared.notes).await;
            if let Err(ProxyError::NoHealthyBackend { .. } | ProxyError::CircuitOpen { .. }) = &picked {
                if let Some(replacement) = reroute(&live, &upstream).filter(|_| reroutes < MAX_REROUTES) {
                    reroutes += 1;
                    upstream = replacement;
                    tried.clear();
                    prepared.notes.rerouted();
                    continue;
                }
            }
            let pick = match (picked, previous.take()) {
                (Ok(pick), _) => pick,
                (Err(_), Some(previous)) => return previous,
                (Err(error), None) => return Err(error),
            };
            let backend = &upstream.backends[pick.index];
            prepared.notes.tried(pick.index, reroutes > 0, &backend.address);
            let outcome = Outcome { upstream: &upstream, index: pick.index, reported: false };

            // 5. This try's request: the backend's target form and protocol.
            let method = prepared.template.as_ref().expect("present until the last try").method.clone();
            let host = prepared.original_host.as_ref();
            let outgoing = next_try(&mut prepared.template, last, &upstream, backend, host, body.for_try(limit))?;

            // 6. Send, bounded by the per-try timeout cut to the route's deadline;
            //    time to response head feeds the latency estimate.
            let started = Instant::now();
            let per_try = policy.and_then(|p| p.config.per_try_timeout);
            let try_deadline = per_try.map_or(deadline, |limit| deadline.min(tokio::time::Instant::now() + limit));
            let sent = clients.send(upstream.protocol, upstream.config.tls.as_ref(), backend, outgoing);
            let result = tokio::time::timeout_at(try_deadline, sent).await;
            let took = started.elapsed();
            backend.upstream_duration.record(took.as_secs_f64());
            let result = match result {
                Ok(Ok(response)) => {
                    pick.guard.state().latency.observe(took);
                    outcome.report(response.status().is_server_error());
                    let retry_as = matches!(response.status().as_u16(), 502..=504).then_some(RetryOn::GatewayError);
                    Try { answer: Ok(response), retry_as }
                }
                Ok(Err(error)) => {
                    let (error, retry_as) = classify(error, &backend.address, limit);
                    if error.is_backend_failure() {
                        outcome.report(true);
                    }
                    Try { answer: Err(error), retry_as }
                }
                Err(_elapsed) => {
                    outcome.report(true);
                    let route_deadline = try_deadline >= deadline;
                    let retry_as = (!route_deadline).then_some(RetryOn::Timeout);
                    Try { answer: Err(ProxyError::UpstreamTimeout), retry_as }
                }
            };

            // 7. Retry if the policy, the method and the budget all allow it.
            let retry = match (policy, result.retry_as) {
                (Some(policy), Some(reason)) if !last && retry::allows(&policy.config, reason, &method) => {
                    if policy.budget.try_withdraw(policy.config.budget_ratio, policy.config.budget_min_per_second) {
                        crate::metrics::retry(&route.name, &upstream.name, retry::reason_label(reason));
                        Some((policy, reason))
                    } else {
                        crate::metrics::retry_budget_exhausted(&route.name, &upstream.name);
                        None
                    }
                }
                _ => None,
            };
            let Some((policy, reason)) = retry else {
                return match result.answer {
                    Ok(response) => Ok(respond(response, pick.guard, prepared.client_upgrade.take(), &prepared.conn)),
                    Err(error) => Err(error),
                };
            };
            tracing::debug!(backend = %backend.address, attempt, reason = retry::reason_label(reason), "retrying");
            tried.push(pick.index);
            attempts_made += 1;
            // Give the slot back before waiting: the backoff is not the backend's time.
            drop(pick);
            let answer = result.answer.map(unguarded);
            let resume = tokio::time::Instant::now() + retry::backoff(&policy.config, attempt - 1);
            if resume >= deadline {
                // No try could start in time: the client gets this one's answer now.
                return answer;
            }
            previous = Some(answer);
            tokio::time::sleep_until(resume).await;
        }
    }
}

/// One try's request head as `backend` takes it: origin form and `Host` over
/// HTTP/1.1, the absolute URI over HTTP/2 (the original host travels in
/// X-Forwarded-Host).
fn for_backend(
    mut parts: http::request::Parts,
    upstream: &Upstream,
    backend: &crate::backend::Backend,
    original_host: Option<&HeaderValue>,
) -> Result<http::request::Parts, ProxyError> {
    match upstream.protocol {
        UpstreamProtocol::Http1 => {
            parts.uri = origin_form(parts.uri);
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                let host = original_host.cloned().unwrap_or_else(|| {
                    HeaderValue::from_str(backend.authority.as_str()).expect("an authority is a valid header value")
                });
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
            parts.uri = backend_uri(parts.uri, &backend.authority)?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(parts)
}

/// How many times one request may move to a reloaded upstream.
const MAX_REROUTES: u32 = 3;

/// The live config's upstream of the same name, if a reload replaced `upstream`.
fn reroute(live: &WorkerLive, upstream: &Arc<Upstream>) -> Option<Arc<Upstream>> {
    let current = crate::state::current(live);
    current.upstreams.iter().find(|u| u.name == upstream.name && !Arc::ptr_eq(u, upstream)).cloned()
}

/// One try's result, and the retry condition it matches, if any.
struct Try {
    answer: Result<Response<UpstreamBody>, ProxyError>,
    retry_as: Option<RetryOn>,
}

/// The request body, either kept for replay or streamed once.
enum RequestBody {
    Replay(Bytes),
    Streaming(Option<ClientBody>),
}

impl RequestBody {
    /// Streams the body, unless there is none (most GETs): an empty body costs
    /// no allocation.
    fn streaming(body: ClientBody) -> RequestBody {
        if body.is_end_stream() {
            RequestBody::Replay(Bytes::new())
        } else {
            RequestBody::Streaming(Some(body))
        }
    }

    /// Keeps the body in memory if it is empty or declares a small length;
    /// otherwise it streams (and the request will not be retried).
    async fn replayable(body: ClientBody, deadline: tokio::time::Instant) -> Result<RequestBody, ProxyError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replay(Bytes::new()));
        }
        match body.size_hint().exact() {
            Some(length) if length <= MAX_REPLAY_BODY => {
                let collect = Limited::new(body, MAX_REPLAY_BODY as usize).collect();
                match tokio::time::timeout_at(deadline, collect).await {
                    Ok(Ok(collected)) => Ok(RequestBody::Replay(collected.to_bytes())),
                    Ok(Err(error)) => Err(client_body_failure(&*error)
                        .unwrap_or(ProxyError::BadRequest("request body was malformed or cut off"))),
                    Err(_) => Err(ProxyError::UpstreamTimeout),
                }
            }
            _ => Ok(RequestBody::Streaming(Some(body))),
        }
    }

    fn for_try(&mut self, limit: u64) -> ProxyBody {
        match self {
            // `Empty` is zero-sized: boxing it allocates nothing.
            RequestBody::Replay(bytes) if bytes.is_empty() => crate::body::empty(),
            RequestBody::Replay(bytes) => crate::body::full(bytes.clone()),
            RequestBody::Streaming(body) => {
                let body = body.take().expect("a streamed body is sent once");
                Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed_unsync()
            }
        }
    }
}

/// What the client is told when reading its own request body failed: the
/// client's fault, never the backend's. `None` when the error came from elsewhere.
fn client_body_failure(error: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(ClientBodyTimeout(idle)) = cause.downcast_ref::<ClientBodyTimeout>() {
            return Some(ProxyError::ClientTimeout(*idle));
        }
        if cause.is::<ClientBodyError>() {
            return Some(ProxyError::BadRequest("request body was malformed or cut off"));
        }
        source = cause.source();
    }
    None
}

/// A response for the client built from a try that will not be the last one
/// sent, without the backend slot attached (it was given back already).
fn unguarded(mut response: Response<UpstreamBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(response.headers_mut(), false);
    response.map(|body| body.boxed_unsync())
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// Picks a backend for the request, excluding those already tried while any
/// other can serve. With a queue configured and every eligible backend busy,
/// waits in line (see `queue`); otherwise fails at once with the reason.
async fn pick_backend(
    upstream: &Upstream,
    parts: &http::request::Parts,
    conn: &ConnInfo,
    tried: &[usize],
    route_deadline: tokio::time::Instant,
    notes: &RequestNotes,
) -> Result<Pick, ProxyError> {
    let request =
        |exclude| PickRequest { headers: &parts.headers, uri: &parts.uri, client_ip: conn.client.ip(), exclude };
    let try_pick = || {
        upstream.balancer.pick(&upstream.backends, &request(tried)).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                upstream.balancer.pick(&upstream.backends, &request(&[]))
            }
        })
    };
    let unavailable = || match upstream.unavailable() {
        Unavailable::CircuitOpen => ProxyError::CircuitOpen { upstream: upstream.name.to_string() },
        Unavailable::NoHealthy | Unavailable::AllBusy => {
            ProxyError::NoHealthyBackend { upstream: upstream.name.to_string() }
        }
    };
    let (Some(queue), Some(config)) = (&upstream.queue, &upstream.config.queue) else {
        return try_pick().ok_or_else(unavailable);
    };
    let priority = Priority::from_header(config.priority_header.as_ref().and_then(|h| parts.headers.get(h)));
    let mut joined: Option<tokio::time::Instant> = None;
    let mut woken = false;
    let outcome = loop {
        // While others wait, a newcomer queues behind them instead of taking
        // the slot the first of them was woken for.
        if woken || queue.waiting() == 0 {
            if let Some(pick) = try_pick() {
                break Ok(pick);
            }
            if upstream.unavailable() != Unavailable::AllBusy {
                break Err(unavailable());
            }
        }
        let joined_at = *joined.get_or_insert_with(tokio::time::Instant::now);
        let queue_deadline = joined_at + config.timeout;
        let deadline = queue_deadline.min(route_deadline);
        let Some(ticket) = queue.join(priority, config.max_waiting as usize, woken) else {
            crate::metrics::queue_rejected(&upstream.name, "full");
            break Err(ProxyError::QueueFull { upstream: upstream.name.to_string() });
        };
        // Alone in the queue: a slot may have freed between the failed pick
        // and joining, with nobody there to be woken for it.
        if queue.waiting() == 1 {
            if let Some(pick) = try_pick() {
                break Ok(pick);
            }
        }
        if tokio::time::timeout_at(deadline, ticket.wait()).await.is_err() {
            if deadline < queue_deadline {
                break Err(ProxyError::UpstreamTimeout);
            }
            crate::metrics::queue_rejected(&upstream.name, "timeout");
            break Err(ProxyError::QueueTimeout { upstream: upstream.name.to_string() });
        }
        woken = true;
    };
    // The clock is read only by requests that really queued.
    if let Some(joined) = joined {
        notes.queued(joined.elapsed());
    }
    outcome
}

/// The response for the client: a tunnel for a 101, else the backend's
/// response streaming back while holding the backend's slot.
fn respond(
    mut response: Response<UpstreamBody>,
    guard: InFlightGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    conn: &Arc<ConnInfo>,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(client_upgrade), Some(backend)) = (client_upgrade, response.body_mut().take_upgrade()) {
            let tunnel = tunnel(client_upgrade, backend, guard, Arc::clone(conn));
            match &conn.tunnels {
                // Tracked, so that the listener's drain waits for it.
                Some(home) => drop(home.tracker.spawn(tunnel)),
                None => drop(tokio::spawn(tunnel)),
            }
            return response.map(|_| crate::body::empty());
        }
    }
    strip_hop_by_hop(response.headers_mut(), false);
    response.map(|body| Guarded::new(body, guard).boxed_unsync())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether the request asks for a protocol switch the proxy tunnels: WebSocket
/// only. Any other `Upgrade` (notably `h2c`, which would hand the client a raw
/// HTTP/2 connection to the backend, past routing) is stripped as hop-by-hop.
fn is_upgrade<B>(request: &Request<B>) -> bool {
    let mut upgrades = request.headers().get_all(header::UPGRADE).iter();
    let websocket = upgrades.next().is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    request.version() == Version::HTTP_11
        && websocket
        && upgrades.next().is_none()
        && connection_tokens(request.headers()).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes the headers that describe one connection rather than the message
/// (RFC 9110 section 7.6.1), including any named in `Connection`. `TE: trailers`
/// survives because gRPC requires it end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are present (most messages carry
    // none, or only `Connection: keep-alive`); only those are removed, each
    // removal being a hashed lookup.
    let hop_by_hop: [&HeaderName; 10] = [
        &header::CONNECTION,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &HTTP2_SETTINGS,
        &header::TRANSFER_ENCODING,
        &header::TRAILER,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
    ];
    let mut present = 0u16;
    for name in headers.keys() {
        // A match on the text (its length first) rather than ten comparisons
        // of header names: this runs for every header of every message.
        let index = match name.as_str() {
            "connection" => 0,
            "upgrade" => 1,
            "keep-alive" => 2,
            "proxy-connection" => 3,
            "http2-settings" => 4,
            "transfer-encoding" => 5,
            "trailer" => 6,
            "proxy-authenticate" => 7,
            "proxy-authorization" => 8,
            "te" => 9,
            _ => continue,
        };
        debug_assert_eq!(hop_by_hop[index], name);
        present |= 1 << index;
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & 1 != 0 {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter(|token| !["keep-alive", "close", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t)))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        present &= !0b11;
    }
    for (index, name) in hop_by_hop.iter().enumerate() {
        if present & (1 << index) == 0 {
            continue;
        }
        if **name == header::TE && headers.get(header::TE).is_none_or(|te| te == "trailers") {
            continue;
        }
        headers.remove(*name);
    }
}

fn add_forwarding_headers(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<&HeaderValue>) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => HeaderValue::try_from(format!("{previous}, {}", conn.client.ip()))
            .unwrap_or_else(|_| conn.client_ip_header.clone()),
        None => conn.client_ip_header.clone(),
    };
    headers.insert(&X_FORWARDED_FOR, forwarded_for);
    let proto = if conn.tls { "https" } else { "http" };
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = host {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
}

/// The path and query alone: what an HTTP/1.1 request line carries to an
/// origin server.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    uri.path_and_query().map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()))
}

fn backend_uri(uri: Uri, authority: &http::uri::Authority) -> Result<Uri, ProxyError> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

/// Maps a client failure to what the client is told and the retry condition
/// it matches. A request body that exceeded the limit or broke mid-stream
/// surfaces here as the body's error and is the client's fault, never retried.
fn classify(error: SendError, backend: &str, limit: u64) -> (ProxyError, Option<RetryOn>) {
    let error = match error {
        SendError::Connect(source) => {
            // A certificate problem is configuration, not a passing failure:
            // say which one, once per failed connection.
            if let Some(failed) = source.downcast_ref::<crate::client::TlsHandshakeFailed>() {
                tracing::warn!(backend, error = %failed, "cannot connect to backend over TLS");
            }
            let error = ProxyError::UpstreamConnect { backend: backend.to_owned(), source };
            return (error, Some(RetryOn::ConnectFailure));
        }
        SendError::Request(error) => error,
    };
    let mut refused = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(cause) = source {
        if let Some(alert) = tls_refusal(cause) {
            // With TLS 1.3 a backend refuses our client certificate only after
            // the client's side of the handshake is done, at the first read:
            // nothing was processed, so it is a failure to connect.
            tracing::warn!(backend, error = %alert, "cannot connect to backend over TLS: it refused the handshake");
            return (
                ProxyError::UpstreamConnect { backend: backend.to_owned(), source: error },
                Some(RetryOn::ConnectFailure),
            );
        }
        if cause.is::<http_body_util::LengthLimitError>() {
            return (ProxyError::BodyTooLarge { limit }, None);
        }
        if let Some(error) = client_body_failure(cause) {
            return (error, None);
        }
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            // The backend refused the stream before processing it (RFC 9113 8.7).
            refused |= h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    let reason = if refused { RetryOn::Refused } else { RetryOn::Reset };
    (ProxyError::UpstreamReset { backend: backend.to_owned(), source: error }, Some(reason))
}

/// The alert a backend sent to end the TLS handshake (a client certificate
/// missing or refused, no common parameters), if that is what `cause` is.
fn tls_refusal<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    use rustls::AlertDescription as Alert;
    let io = cause.downcast_ref::<std::io::Error>()?;
    let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::AccessDenied
            | Alert::HandshakeFailure,
        ) => Some(tls),
        _ => None,
    }
}

/// Reports one exchange's outcome to passive health detection and the breaker.
/// Dropped without a report (the client left, or the client's own body failed),
/// it gives no verdict: that says nothing about the backend.
struct Outcome<'a> {
    upstream: &'a Upstream,
    index: usize,
    reported: bool,
}

impl Outcome<'_> {
    fn report(mut self, failed: bool) {
        self.reported = true;
        self.record(failed);
    }

    fn record(&self, failed: bool) {
        self.upstream.record_outcome(self.index, failed);
        let backend = &self.upstream.backends[self.index];
        if let Some(config) = &backend.breaker {
            backend.state.breaker.on_result(config, crate::clock::nanos_since_epoch(), failed);
        }
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.reported {
            // No verdict, but a half-open probe slot is freed.
            self.upstream.backends[self.index].state.breaker.on_abandoned();
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and its
/// backend until either side closes, nothing moves for `tunnel_idle_timeout`,
/// or the listener stops and its `shutdown_grace` runs out. Holds the backend's
/// slot and, through `conn`, the client connection's place under
/// `max_connections` until then.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: Upgraded, _slot: InFlightGuard, conn: Arc<ConnInfo>) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let home = conn.tunnels.as_ref();
    let idle_timeout = home.map_or(crate::config::Limits::default().tunnel_idle_timeout, |h| h.idle_timeout);
    let last_read = Arc::new(AtomicU64::new(crate::clock::nanos_since_epoch()));
    let mut client = ReadActivity { inner: TokioIo::new(client), last_read: Arc::clone(&last_read) };
    let mut backend = ReadActivity { inner: backend, last_read: Arc::clone(&last_read) };
    let idle = async {
        loop {
            let quiet = crate::clock::nanos_since_epoch().saturating_sub(last_read.load(Ordering::Relaxed));
            let quiet = Duration::from_nanos(quiet);
            if quiet >= idle_timeout {
                return;
            }
            tokio::time::sleep(idle_timeout - quiet).await;
        }
    };
    let stopped = async {
        match home {
            Some(home) => {
                let mut stopped = home.stopped.clone();
                let _ = stopped.wait_for(|stopped| *stopped).await;
                tokio::time::sleep(home.shutdown_grace).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(error) = copied {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        }
        () = idle => tracing::debug!(client = %conn.client, ?idle_timeout, "tunnel idle; closing it"),
        () = stopped => tracing::debug!(client = %conn.client, "shutdown grace over; closing tunnel"),
    }
}

pin_project_lite::pin_project! {
    /// Notes when bytes last arrived, for a tunnel's idle timeout. Reads suffice:
    /// every byte a tunnel writes was first read from the other side.
    struct ReadActivity<T> {
        #[pin]
        inner: T,
        last_read: Arc<AtomicU64>,
    }
}

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for ReadActivity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last_read.store(crate::clock::nanos_since_epoch(), Ordering::Relaxed);
        }
        poll
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for ReadActivity<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te", "x-kept"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let conn = ConnInfo::new("10.1.2.3:5555".parse().unwrap(), "web".into());
        let mut headers = HeaderMap::new();
        add_forwarding_headers(&mut headers, &conn, None);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3");
        headers.insert(&X_FORWARDED_FOR, "1.1.1.1".parse().unwrap());
        add_forwarding_headers(&mut headers, &conn, Some(&HeaderValue::from_static("bots")));
        assert_eq!(headers[&X_FORWARDED_FOR], "1.1.1.1, 10.1.2.3");
        assert_eq!(headers[&X_FORWARDED_HOST], "bots");
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
    }
}
