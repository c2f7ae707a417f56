//! The request path as one tower stack, assembled here and only here.
//!
//! Outer to inner:
//! 0. [`ForConnection`]: made per client connection; loads the live snapshot
//!    once per request (the request sees that config to its end), gives the
//!    request its `RequestNotes` (the connection, the snapshot), and keeps
//!    the request counted as active on its connection until its response
//!    body ends (`ActivityBody`), which the listener's idle and drain
//!    handling go by. Never fails.
//! 1. [`RequestId`]: every request and response carries `x-request-id`, the
//!    client's if it sent one, so logs on both sides can be joined. Never fails.
//! 2. [`Observe`]: records the request (metrics, access log) when its response
//!    body ends or the client leaves. Never fails.
//! 3. [`ErrorResponse`]: the one place a [`ProxyError`] becomes the client's
//!    response (status, `x-switchyard-error`, one-line body). Never fails.
//! 4. [`RouteService`]: refuses what must not be forwarded (see `admission`:
//!    CONNECT, a missing or doubled `Host`) and matches the route in the
//!    request's snapshot; fails with `NoRoute` (404), 400 or 405. What it
//!    passes on is a `RoutedRequest`, the only request `Forward` takes.
//! 5. [`Forward`]: picks a backend and forwards, within the route's `timeout`;
//!    fails with `NoHealthyBackend` (503), `UpstreamConnect` / `UpstreamReset`
//!    (502), `UpstreamTimeout` (504) or `BodyTooLarge` (413).
//!
//! Layers pass context down beside the request, in `notes::RequestNotes`
//! (made by layer 0, given the route by routing: a [`NotedRequest`] is what
//! layers 1 to 4 take); they use named futures rather than boxed ones where
//! the logic is a simple mapping.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::{Either, Ready};
use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

use super::admission;
use super::connection::Activity;
use crate::body::{ClientRequestBody, ProxyBody};
use crate::client::UpstreamClients;
use crate::config::RateLimitKey;
use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::notes::{NotedRequest, RequestNotes, RoutedRequest};
use crate::observe::{Observe, ObservedBody};
use crate::proxy::Forward;
use crate::state::{Live, WorkerLive};

/// Layers 1 to 5: the request path below the connection.
type RequestStack = RequestId<Observe<ErrorResponse<RouteService<Forward>>>>;

/// One worker's request path, from which each connection's is made.
#[derive(Clone)]
pub struct WorkerStack {
    inner: RequestStack,
    live: WorkerLive,
}

/// Builds one worker's stack; `live` is read once per request, `clients`
/// are the worker's pools.
pub fn build(live: Live, clients: Arc<UpstreamClients>) -> WorkerStack {
    let inner = ServiceBuilder::new()
        .layer_fn(RequestId)
        .layer_fn(Observe::new)
        .layer_fn(ErrorResponse)
        .layer_fn(|inner| RouteService { inner })
        .service(Forward::new(clients));
    WorkerStack { inner, live: Arc::new(live) }
}

impl WorkerStack {
    /// The whole stack for one client connection (layer 0 on top).
    pub(super) fn for_connection(&self, info: Arc<ConnInfo>, activity: Arc<Activity>) -> ForConnection {
        ForConnection { inner: self.inner.clone(), live: Arc::clone(&self.live), info, activity }
    }
}

// ---- 0. the connection -------------------------------------------------------

#[derive(Clone)]
pub struct ForConnection {
    inner: RequestStack,
    live: WorkerLive,
    info: Arc<ConnInfo>,
    activity: Arc<Activity>,
}

impl Service<Request<ClientRequestBody>> for ForConnection {
    type Response = Response<ActivityBody>;
    type Error = Infallible;
    type Future = TrackActivity<<RequestStack as Service<NotedRequest>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ClientRequestBody>) -> Self::Future {
        // The one load of the live config for this request.
        let snapshot = crate::state::current(&self.live);
        let notes = Arc::new(RequestNotes::new(Arc::clone(&self.info), snapshot));
        self.activity.request_started();
        let http1 = request.version() < http::Version::HTTP_2;
        TrackActivity {
            inner: self.inner.call(NotedRequest { request, notes }),
            activity: Some(Arc::clone(&self.activity)),
            http1,
        }
    }
}

/// [`ForConnection`] for hyper's HTTP/2 server, whose requests carry hyper's body.
#[derive(Clone)]
pub struct ForHttp2Connection(pub ForConnection);

impl Service<Request<Incoming>> for ForHttp2Connection {
    type Response = Response<ActivityBody>;
    type Error = Infallible;
    type Future = <ForConnection as Service<Request<ClientRequestBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        self.0.call(request.map(ClientRequestBody::Http2))
    }
}

// ---- 1. request id -----------------------------------------------------------

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Debug)]
pub struct RequestId<S>(S);

impl<S, B> Service<NotedRequest> for RequestId<S>
where
    S: Service<NotedRequest, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut noted: NotedRequest) -> Self::Future {
        let id = match noted.request.headers_mut().get_mut(&X_REQUEST_ID) {
            Some(id) => {
                id.set_sensitive(true);
                id.clone()
            }
            None => {
                let id = new_request_id();
                noted.request.headers_mut().insert(&X_REQUEST_ID, id.clone());
                id
            }
        };
        WithRequestId { inner: self.0.call(noted), id: Some(id) }
    }
}

/// 128 random bits as 32 hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    let mut text = [0u8; 32];
    for byte in text.iter_mut() {
        *byte = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    // One allocation, shared by the request's and the response's copies (a
    // `Vec`-backed value would allocate again on its first clone).
    let mut id =
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).expect("hex digits are a valid header value");
    // Over HTTP/2, HPACK leaves a "sensitive" value out of its table: each id
    // is new, and indexing it only cost work and evicted the entries (server,
    // content type) that later responses would have reused.
    id.set_sensitive(true);
    id
}

pin_project_lite::pin_project! {
    pub struct WithRequestId<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<B, F: Future<Output = Result<Response<B>, Infallible>>> Future for WithRequestId<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(id) = this.id.take() {
            response.headers_mut().entry(&X_REQUEST_ID).or_insert(id);
        }
        Poll::Ready(Ok(response))
    }
}

// ---- 3. error response (2 is `Observe`, in observe.rs) ----------------------

#[derive(Clone, Debug)]
pub struct ErrorResponse<S>(S);

impl<S> Service<NotedRequest> for ErrorResponse<S>
where
    S: Service<NotedRequest, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ErrorToResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Inner services are always ready; an error here would be a bug, not a request's fault.
        self.0.poll_ready(cx).map(|ready| {
            ready.expect("proxy services are always ready");
            Ok(())
        })
    }

    fn call(&mut self, noted: NotedRequest) -> Self::Future {
        ErrorToResponse { inner: self.0.call(noted) }
    }
}

pin_project_lite::pin_project! {
    pub struct ErrorToResponse<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Result<Response<ProxyBody>, ProxyError>>> Future for ErrorToResponse<F> {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "request failed");
                error.into_response()
            }
        }))
    }
}

// ---- 4. routing (5, `Forward`, is in proxy/mod.rs) -------------------------

#[derive(Clone, Debug)]
pub struct RouteService<S> {
    inner: S,
}

/// A request whose rate limit is shared in Redis goes on in a future of its
/// own (boxed: the others, almost every request, do not carry its room).
type SharedLimitFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl<S> Service<NotedRequest> for RouteService<S>
where
    S: Service<RoutedRequest, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<Ready<Result<Response<ProxyBody>, ProxyError>>, Either<S::Future, SharedLimitFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut noted: NotedRequest) -> Self::Future {
        let refuse = |error| Either::Left(futures_util::future::ready(Err(error)));
        let snapshot = noted.notes.snapshot();
        if let Err(error) = admission::admit(&mut noted.request, snapshot.config.paths.merge_slashes) {
            return refuse(error);
        }
        // The client's address is worked out only where a rule needs it,
        // once; the access log names it for a refused request too.
        let established = std::cell::OnceCell::new();
        let client = || {
            *established.get_or_init(|| {
                let trusted = &snapshot.config.trusted_proxies;
                let conn = noted.notes.conn();
                let client = crate::proxy::rewrite::established_client(noted.request.headers(), conn, trusted);
                if let Some(client) = client.filter(|client| *client != conn.client.ip()) {
                    noted.notes.set_forwarded_client(client);
                }
                client
            })
        };
        if !snapshot.listener_access.is_empty() {
            let bind = noted.notes.conn().bind;
            if let Some((_, rules)) = bind.and_then(|bind| snapshot.listener_access.get(&bind)) {
                if let Err(error) = admitted(rules, client(), "listener", "-") {
                    return refuse(error);
                }
            }
        }
        let Some(index) = snapshot.router.find_index(&noted.request) else {
            return refuse(ProxyError::NoRoute);
        };
        let route = &snapshot.router.routes()[index];
        if !route.access.is_empty() {
            noted.notes.matched(index);
            if let Err(error) = admitted(&route.access, client(), "route", &route.name) {
                return refuse(error);
            }
        }
        // A limit on the request's own keys comes before authentication, so
        // a flood of bad credentials is limited too and costs no signature
        // checks past it; a limit on a token's claim can only come after.
        let rate_limit = route.rate_limit.as_ref();
        // Worked out now, while the headers are the client's.
        let client_ip = rate_limit.map(|_| client().unwrap_or(noted.notes.conn().client.ip()));
        if let (Some(limit), Some(client_ip)) = (rate_limit.filter(|limit| !limit.by_claim()), client_ip) {
            noted.notes.matched(index);
            let spec = match &limit.config.key {
                RateLimitKey::Request(crate::config::KeySpec::ClientIp) | RateLimitKey::Claim(_) => None,
                RateLimitKey::Request(spec) => Some(spec),
            };
            let pick = crate::balance::PickRequest {
                headers: noted.request.headers(),
                uri: noted.request.uri(),
                client_ip,
                exclude: &[],
            };
            // A request without the key (no such header) is limited by its
            // client's own bucket, not one shared by all such.
            let key = spec
                .and_then(|spec| crate::balance::extract_key(spec, &pick, |bytes| limit.key(bytes)))
                .unwrap_or_else(|| limit.client_key(client_ip));
            if limit.shared() {
                let bucket = spec
                    .and_then(|spec| crate::balance::extract_key(spec, &pick, |bytes| limit.shared_key(bytes)))
                    .unwrap_or_else(|| limit.shared_client_key(client_ip));
                let (limit, inner) = (Arc::clone(limit), self.take_inner());
                return Either::Right(Either::Right(Box::pin(async move {
                    limit.take_shared(&bucket, key).await.map_err(|wait| refused(&limit, wait))?;
                    let notes = Arc::clone(&noted.notes);
                    let route = &notes.snapshot().router.routes()[index];
                    authenticated(inner, noted, route, index, client_ip).await
                })));
            }
            if let Err(wait) = limit.take(key) {
                return refuse(refused(limit, wait));
            }
        }
        if route.auth.is_none() {
            return Either::Right(Either::Left(self.inner.call(noted.routed(index))));
        }
        let claim_limit = match authenticate(&mut noted.request, &noted.notes, route, index, client_ip) {
            Ok(claim_limit) => claim_limit,
            Err(error) => return refuse(error),
        };
        match claim_limit {
            None => Either::Right(Either::Left(self.inner.call(noted.routed(index)))),
            Some(SharedTake { limit, bucket, local }) => {
                let (limit, mut inner) = (Arc::clone(limit), self.take_inner());
                Either::Right(Either::Right(Box::pin(async move {
                    limit.take_shared(&bucket, local).await.map_err(|wait| refused(&limit, wait))?;
                    inner.call(noted.routed(index)).await
                })))
            }
        }
    }
}

impl<S: Clone> RouteService<S> {
    /// The inner service, polled ready, for a request that goes on in a
    /// future of its own; a clone takes its place for the next request.
    fn take_inner(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

/// A route's `auth` passed and any claim's limit taken, the request goes on.
async fn authenticated<S>(
    mut inner: S,
    mut noted: NotedRequest,
    route: &crate::route::Route,
    index: usize,
    client_ip: std::net::IpAddr,
) -> Result<Response<ProxyBody>, ProxyError>
where
    S: Service<RoutedRequest, Response = Response<ProxyBody>, Error = ProxyError>,
{
    if route.auth.is_some() {
        if let Some(SharedTake { limit, bucket, local }) =
            authenticate(&mut noted.request, &noted.notes, route, index, Some(client_ip))?
        {
            limit.take_shared(&bucket, local).await.map_err(|wait| refused(limit, wait))?;
        }
    }
    inner.call(noted.routed(index)).await
}

/// A token still to take from a shared bucket (see [`RateLimit::take_shared`](crate::ratelimit::RateLimit::take_shared)).
struct SharedTake<'r> {
    limit: &'r Arc<crate::ratelimit::RateLimit>,
    bucket: String,
    local: u64,
}

/// The route's `auth`, then a rate limit keyed by one of its claims (a
/// token without the claim is limited by its client's bucket), taken here
/// unless it is shared: `Ok(Some)` is a shared bucket still to take.
fn authenticate<'r, B>(
    request: &mut Request<B>,
    notes: &crate::notes::RequestNotes,
    route: &'r crate::route::Route,
    index: usize,
    client_ip: Option<std::net::IpAddr>,
) -> Result<Option<SharedTake<'r>>, ProxyError> {
    let Some(auth) = &route.auth else { return Ok(None) };
    notes.matched(index);
    let passed = auth.check(request, notes.conn().client_cert.as_ref()).map_err(|refusal| {
        crate::metrics::access_denied(&route.name, refusal.metric_reason());
        refusal.into_error()
    })?;
    if let Some(principal) = passed.principal {
        notes.set_principal(principal);
    }
    let Some(limit) = route.rate_limit.as_ref().filter(|limit| limit.by_claim()) else { return Ok(None) };
    let client_ip = client_ip.expect("worked out where the route has a rate limit");
    let key = match &passed.claim_key {
        Some(claim) => limit.key(claim),
        None => limit.client_key(client_ip),
    };
    if limit.shared() {
        let bucket = match &passed.claim_key {
            Some(claim) => limit.shared_key(claim),
            None => limit.shared_client_key(client_ip),
        };
        return Ok(Some(SharedTake { limit, bucket, local: key }));
    }
    limit.take(key).map_err(|wait| refused(limit, wait))?;
    Ok(None)
}

/// 429 for a request `limit` refused for `wait` (counted).
fn refused(limit: &crate::ratelimit::RateLimit, wait: std::time::Duration) -> ProxyError {
    crate::metrics::access_denied(limit.route(), "rate_limited");
    let (requests, per) = (limit.config.requests, limit.config.per);
    ProxyError::RateLimited { requests, per, retry_after: wait }
}

/// `client` against a listener's or route's `allow` / `deny`; a refusal is
/// counted in `switchyard_access_denied_total`.
fn admitted(
    rules: &crate::config::AddressRules,
    client: Option<std::net::IpAddr>,
    scope: &'static str,
    route: &str,
) -> Result<(), ProxyError> {
    rules.admit(client).map_err(|refusal| {
        crate::metrics::access_denied(route, "address");
        ProxyError::Forbidden { client, scope, refusal }
    })
}

pin_project_lite::pin_project! {
    /// Hands the request's place in its connection's activity to the
    /// response body ([`ActivityBody`]), or gives it up if the request is
    /// dropped before a response (client gone).
    pub struct TrackActivity<F> {
        #[pin]
        inner: F,
        activity: Option<Arc<Activity>>,
        http1: bool,
    }

    impl<F> PinnedDrop for TrackActivity<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(activity) = this.project().activity.take() {
                activity.request_finished();
            }
        }
    }
}

impl<F> std::future::Future for TrackActivity<F>
where
    F: std::future::Future<Output = Result<Response<ObservedBody>, Infallible>>,
{
    type Output = Result<Response<ActivityBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        let activity = this.activity.take().expect("polled after completion");
        if *this.http1
            && activity.draining.load(Ordering::Acquire)
            && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
        {
            // The connection closes after a response that says so.
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response.map(|body| ActivityBody { inner: body, activity: Some(activity) })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request active in its connection's
    /// [`Activity`] until the body ends or is dropped: a connection with a
    /// download in progress is not idle.
    pub struct ActivityBody {
        #[pin]
        inner: ObservedBody,
        activity: Option<Arc<Activity>>,
    }

    impl PinnedDrop for ActivityBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some(activity) = this.project().activity.take() {
                activity.request_finished();
            }
        }
    }
}

impl http_body::Body for ActivityBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            if let Some(activity) = this.activity.take() {
                activity.request_finished();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
