//! The body type of every request and response the proxy produces, and the
//! client's request body with its idle bound. (A backend's response body,
//! which holds its slot, is `proxy::response`.)

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
pub struct ClientBodyError(pub hyper::Error);

/// The client sent no part of its request body for this long.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
pub struct ClientBodyTimeout(pub std::time::Duration);

pin_project_lite::pin_project! {
    /// A client's request body on its way to a backend. Each wait for the
    /// client's next frame is bounded by `idle` (`client_body_timeout`); waits
    /// for the backend to take a frame are not the client's and do not count.
    /// The timer is made only when the client actually keeps the proxy waiting.
    pub struct ClientBody {
        #[pin]
        inner: hyper::body::Incoming,
        idle: std::time::Duration,
        waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl ClientBody {
    pub fn new(inner: hyper::body::Incoming, idle: std::time::Duration) -> Self {
        ClientBody { inner, idle, waiting: None }
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
