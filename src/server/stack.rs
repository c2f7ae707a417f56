//! The request path as one tower stack, assembled here and only here.
//!
//! Outer to inner:
//! 1. [`RequestId`]: every request and response carries `x-request-id`, the
//!    client's if it sent one, so logs on both sides can be joined. Never fails.
//! 2. [`Observe`]: records the request (metrics, access log) when its response
//!    body ends or the client leaves. Never fails.
//! 3. [`ErrorResponse`]: the one place a [`ProxyError`] becomes the client's
//!    response (status, `x-switchyard-error`, one-line body). Never fails.
//! 4. [`RouteService`]: refuses what must not be forwarded (see `admission`:
//!    CONNECT, a missing or doubled `Host`), loads the live snapshot once and
//!    matches the route; fails with `NoRoute` (404), 400 or 405.
//! 5. [`Forward`]: picks a backend and forwards, within the route's `timeout`;
//!    fails with `NoHealthyBackend` (503), `UpstreamConnect` / `UpstreamReset`
//!    (502), `UpstreamTimeout` (504) or `BodyTooLarge` (413).
//!
//! Layers pass context down beside the request, in `notes::RequestNotes`
//! (made by the listener with its `ConnInfo`, given the route by routing: a
//! [`NotedRequest`] is what each layer takes); they use named futures rather
//! than boxed ones where the logic is a simple mapping.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::{Either, Ready};
use http::{HeaderName, HeaderValue, Response};
use tower::{Service, ServiceBuilder};

use super::admission;
use crate::body::ProxyBody;
use crate::client::UpstreamClients;
use crate::error::ProxyError;
use crate::notes::NotedRequest;
use crate::observe::Observe;
use crate::proxy::Forward;
use crate::state::{Live, WorkerLive};

/// The complete request path for one proxy instance.
pub type ProxyStack = RequestId<Observe<ErrorResponse<RouteService<Forward>>>>;

/// Builds one worker's stack; `live` is read per request, `clients` are the
/// worker's pools.
pub fn build(live: Live, clients: Arc<UpstreamClients>) -> ProxyStack {
    let live: WorkerLive = Arc::new(live);
    ServiceBuilder::new()
        .layer_fn(RequestId)
        .layer_fn(|inner| Observe::new(inner, Arc::clone(&live)))
        .layer_fn(ErrorResponse)
        .layer_fn(|inner| RouteService { inner, live: Arc::clone(&live) })
        .service(Forward::new(clients, Arc::clone(&live)))
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
    live: WorkerLive,
}

impl<S> Service<NotedRequest> for RouteService<S>
where
    S: Service<NotedRequest, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<Ready<Result<Response<ProxyBody>, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut noted: NotedRequest) -> Self::Future {
        // One load per request: this request sees this snapshot to its end.
        let snapshot = crate::state::current(&self.live);
        if let Err(error) = admission::admit(&mut noted.request, snapshot.config.paths.merge_slashes) {
            return Either::Left(futures_util::future::ready(Err(error)));
        }
        let Some(index) = snapshot.router.find_index(&noted.request) else {
            return Either::Left(futures_util::future::ready(Err(ProxyError::NoRoute)));
        };
        noted.notes.set_route(snapshot, index);
        Either::Right(self.inner.call(noted))
    }
}
