//! The innermost service: pick a backend, rewrite the request, forward it, and
//! stream the response back.
//!
//! Reads top to bottom as one function, [`forward`], with a comment per step.
//! Bodies are never buffered: the request body streams to the backend through a
//! size limit, the response body streams back holding the backend's in-flight slot
//! until its last byte. `Upgrade` requests (WebSocket) become a byte tunnel after
//! the backend answers 101.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::balance::PickRequest;
use crate::body::{BoxError, Guarded, ProxyBody};
use crate::client::UpstreamClients;
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::server::stack::RouteMatch;
use crate::upstream::InFlightGuard;

/// Facts about the client connection a request arrived on, attached to every
/// request by the listener.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub listener: Arc<str>,
    /// The client IP, pre-rendered once per connection for `X-Forwarded-For`.
    pub client_ip_header: HeaderValue,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, listener: Arc<str>) -> Self {
        let client_ip_header = HeaderValue::try_from(client.ip().to_string()).expect("an IP is a valid header value");
        ConnInfo { client, listener, client_ip_header }
    }
}

#[derive(Clone, Debug)]
pub struct Forward {
    clients: Arc<UpstreamClients>,
}

impl Forward {
    pub fn new(clients: Arc<UpstreamClients>) -> Self {
        Forward { clients }
    }
}

type ForwardFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> ForwardFuture {
        Box::pin(forward(Arc::clone(&self.clients), request))
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

async fn forward(
    clients: Arc<UpstreamClients>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let matched = request.extensions_mut().remove::<RouteMatch>().expect("the route layer runs first");
    let conn = request.extensions_mut().remove::<ConnInfo>().expect("the listener attaches ConnInfo");
    let upstream = &matched.route().upstream;

    // 1. Refuse a body that declares itself too large before touching a backend.
    let limit = matched.snapshot.limits.max_body_bytes;
    if content_length(request.headers()).is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }

    // 2. Pick a backend; the pick reserves its in-flight slot.
    let pick = upstream
        .balancer
        .pick(
            &upstream.backends,
            &PickRequest { headers: request.headers(), uri: request.uri(), client_ip: conn.client.ip() },
        )
        .ok_or_else(|| ProxyError::NoHealthyBackend { upstream: upstream.name.to_string() })?;
    let backend = &upstream.backends[pick.index];
    let outcome = Outcome {
        upstream,
        index: pick.index,
        deadline: matched.route().timeout.map(|t| Instant::now() + t),
        reported: false,
    };

    // 3. Rewrite for the backend: absolute URI, forwarding headers, no hop-by-hop.
    let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let original_host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    add_forwarding_headers(&mut parts.headers, &conn, original_host.as_ref());
    parts.uri = backend_uri(parts.uri, &backend.authority)?;
    match upstream.protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            if let (false, Some(host)) = (parts.headers.contains_key(header::HOST), original_host) {
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
            // HTTP/2 carries the authority in the URI; the original host travels
            // in X-Forwarded-Host.
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    let body = body.map_err(ClientBodyError);
    let body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed_unsync();
    let outgoing = Request::from_parts(parts, body);

    // 4. Send; time to response head feeds the latency estimate.
    let started = Instant::now();
    let result = clients.for_protocol(upstream.protocol).request(outgoing).await;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            let error = classify(error, &backend.address, limit);
            outcome.report(error.is_backend_failure());
            return Err(error);
        }
    };
    pick.guard.state().latency.observe(started.elapsed());
    outcome.report(response.status().is_server_error());

    // 5. A 101 turns the exchange into a tunnel that owns the in-flight slot.
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, backend_upgrade, pick.guard));
            return Ok(response.map(|_| crate::body::empty()));
        }
    }

    // 6. Stream the response back, holding the slot until its body ends.
    strip_hop_by_hop(response.headers_mut(), false);
    let guard = pick.guard;
    Ok(response.map(|body| Guarded::new(body, guard).map_err(BoxError::from).boxed_unsync()))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
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
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter(|token| !["keep-alive", "close", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t)))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::TRAILER);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

fn add_forwarding_headers(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<&HeaderValue>) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => HeaderValue::try_from(format!("{previous}, {}", conn.client.ip()))
            .unwrap_or_else(|_| conn.client_ip_header.clone()),
        None => conn.client_ip_header.clone(),
    };
    headers.insert(&X_FORWARDED_FOR, forwarded_for);
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
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

/// Maps a client failure to what the client is told. A request body that
/// exceeded the limit mid-stream surfaces here as the body's error.
fn classify(error: hyper_util::client::legacy::Error, backend: &str, limit: u64) -> ProxyError {
    if error.is_connect() {
        return ProxyError::UpstreamConnect { backend: backend.to_owned(), source: Box::new(error) };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge { limit };
        }
        if cause.is::<ClientBodyError>() {
            return ProxyError::BadRequest("request body was malformed or cut off");
        }
        source = cause.source();
    }
    ProxyError::UpstreamReset { backend: backend.to_owned(), source: Box::new(error) }
}

/// Reports one exchange's outcome to passive health detection. Dropped without
/// a report (the route timeout cancelled the exchange, or the client left), it
/// counts a failure only if the route's deadline has passed: a client that gives
/// up early says nothing about the backend.
struct Outcome<'a> {
    upstream: &'a crate::upstream::Upstream,
    index: usize,
    deadline: Option<Instant>,
    reported: bool,
}

impl Outcome<'_> {
    fn report(mut self, failed: bool) {
        self.reported = true;
        crate::health::passive::record(self.upstream, self.index, failed);
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.reported && self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            crate::health::passive::record(self.upstream, self.index, true);
        }
    }
}

/// Marks a failure reading the client's request body, so that it is not blamed
/// on the backend.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed: {0}")]
struct ClientBodyError(hyper::Error);

async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade, _slot: InFlightGuard) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
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
