//! The body type of every request and response the proxy produces, the
//! client's request body as either listener protocol delivers it
//! ([`ClientRequestBody`]: fed by our HTTP/1.1 connection, or hyper's HTTP/2
//! stream) and with its idle bound ([`ClientBody`]). (A backend's response
//! body, which holds its slot, is `proxy::response`.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin. `Unsync` because hyper's `Incoming` is not
/// `Sync` and nothing here shares a body between threads.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A failure reading the client's request body, marked so that it is never
/// blamed on the backend.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed: {0}")]
pub struct ClientBodyError(pub BoxError);

/// The client sent no part of its request body for this long.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
pub struct ClientBodyTimeout(pub std::time::Duration);

pin_project_lite::pin_project! {
    /// A client's request body on its way to a backend. Each wait for the
    /// client's next frame is bounded by `idle` (`client_body_timeout`); waits
    /// for the backend to take a frame are not the client's and do not count.
    /// The timer is made only when the client actually keeps the proxy waiting.
    /// The bytes read are added to `received` once, when the body is dropped.
    pub struct ClientBody {
        #[pin]
        inner: ClientRequestBody,
        idle: std::time::Duration,
        waiting: Option<Pin<Box<tokio::time::Sleep>>>,
        received: Option<(metrics::Counter, u64)>,
    }

    impl PinnedDrop for ClientBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some((counter, bytes)) = this.project().received.take() {
                counter.increment(bytes);
            }
        }
    }
}

impl ClientBody {
    /// `received` counts the body's bytes (a request without a body does not
    /// hold it).
    pub fn new(inner: ClientRequestBody, idle: std::time::Duration, received: &metrics::Counter) -> Self {
        let received = (!matches!(inner, ClientRequestBody::Empty)).then(|| (received.clone(), 0));
        ClientBody { inner, idle, waiting: None, received }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = None;
                if let (Some(Ok(frame)), Some((_, bytes))) = (&frame, this.received.as_mut()) {
                    *bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(|error| ClientBodyError(error).into())))
            }
            Poll::Pending => {
                let idle = *this.idle;
                let timer = this.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ClientBodyTimeout(idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body, as its listener's protocol delivers it.
pub enum ClientRequestBody {
    /// No body: nothing to read, nothing allocated.
    Empty,
    /// From our HTTP/1.1 connection, which reads it as it is asked for.
    Http1(FedBody),
    Http2(hyper::body::Incoming),
}

impl Body for ClientRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientRequestBody::Empty => Poll::Ready(None),
            ClientRequestBody::Http1(body) => Pin::new(body).poll_frame(cx),
            ClientRequestBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientRequestBody::Empty => true,
            ClientRequestBody::Http1(body) => body.is_end_stream(),
            ClientRequestBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientRequestBody::Empty => SizeHint::with_exact(0),
            ClientRequestBody::Http1(body) => body.size_hint(),
            ClientRequestBody::Http2(body) => body.size_hint(),
        }
    }
}

/// A body a connection task feeds, one frame at a time and only when asked:
/// the connection reads the client's socket for it only while whoever holds
/// the body (a backend exchange, on any task) waits for the next frame, so
/// a backend that takes its time is not a reason to buffer the client.
pub struct FedBody {
    shared: std::sync::Arc<std::sync::Mutex<Feed>>,
    /// Bytes still to come when the length is known.
    remaining: Option<u64>,
}

/// The connection's side of a [`FedBody`].
pub struct BodyFeeder {
    shared: std::sync::Arc<std::sync::Mutex<Feed>>,
}

#[derive(Default)]
struct Feed {
    /// The frame handed over and not yet taken (at most one).
    frame: Option<Frame<Bytes>>,
    /// The body ended: `Some(None)` complete, `Some(Some(error))` failed.
    end: Option<Option<BoxError>>,
    /// The body's holder waits for a frame.
    wanted: bool,
    /// The holder dropped the body.
    abandoned: bool,
    holder: Option<std::task::Waker>,
    feeder: Option<std::task::Waker>,
}

impl FedBody {
    /// A body and its feeder; `length` when the client declared it.
    pub fn new(length: Option<u64>) -> (FedBody, BodyFeeder) {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(Feed::default()));
        (FedBody { shared: std::sync::Arc::clone(&shared), remaining: length }, BodyFeeder { shared })
    }
}

impl Body for FedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut feed = this.shared.lock().expect("never poisoned");
        if let Some(frame) = feed.frame.take() {
            feed.wanted = false;
            if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                *remaining = remaining.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(end) = feed.end.take() {
            feed.end = Some(None);
            return Poll::Ready(end.map(Err));
        }
        if !feed.holder.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            feed.holder = Some(cx.waker().clone());
        }
        if !feed.wanted {
            feed.wanted = true;
            if let Some(feeder) = &feed.feeder {
                feeder.wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Drop for FedBody {
    fn drop(&mut self) {
        let mut feed = self.shared.lock().expect("never poisoned");
        feed.abandoned = true;
        if let Some(feeder) = feed.feeder.take() {
            feeder.wake();
        }
    }
}

impl Drop for BodyFeeder {
    /// A connection that ends before the body did fails it, rather than
    /// leaving its holder waiting.
    fn drop(&mut self) {
        let mut feed = self.shared.lock().expect("never poisoned");
        if feed.end.is_none() {
            feed.end = Some(Some("the client connection ended before the body".into()));
            if let Some(holder) = feed.holder.take() {
                holder.wake();
            }
        }
    }
}

/// What the body's holder wants of the connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// The next frame: read the client for it.
    Frame,
    /// Nothing yet (a frame waits to be taken, or no one asked).
    Nothing,
    /// The body was dropped: nothing more will be taken.
    Abandoned,
}

impl BodyFeeder {
    /// Whether a frame is wanted; registers the connection's task to be woken
    /// when that changes.
    pub fn demand(&self, cx: &mut Context<'_>) -> Demand {
        let mut feed = self.shared.lock().expect("never poisoned");
        if feed.abandoned {
            return Demand::Abandoned;
        }
        if !feed.feeder.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            feed.feeder = Some(cx.waker().clone());
        }
        if feed.wanted && feed.frame.is_none() {
            Demand::Frame
        } else {
            Demand::Nothing
        }
    }

    /// Hands over a frame (data or trailers).
    pub fn send(&self, frame: Frame<Bytes>) {
        let mut feed = self.shared.lock().expect("never poisoned");
        feed.frame = Some(frame);
        if let Some(holder) = feed.holder.take() {
            holder.wake();
        }
    }

    /// Ends the body: complete, or failed with `error`.
    pub fn finish(&self, error: Option<BoxError>) {
        let mut feed = self.shared.lock().expect("never poisoned");
        feed.end = Some(error);
        if let Some(holder) = feed.holder.take() {
            holder.wake();
        }
    }
}
