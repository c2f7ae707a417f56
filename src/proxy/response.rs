//! A backend's response body on its way to the client: it holds the backend's
//! in-flight slot until its last byte, and bounds each wait for the backend's
//! next bytes by `limits.backend_read_timeout` (nginx's `proxy_read_timeout`).
//!
//! The route's `timeout` ends at the response head, because an RPA job may
//! work for minutes before it answers; after the head, a backend that stops
//! sending would otherwise hold its slot (for a one-job bot, the bot) for as
//! long as the client waits. When the bound is reached the body fails: the
//! client's connection is cut (its response is already under way, there is
//! no status left to send), the backend connection is dropped, the slot is
//! freed, and the stall counts against the backend as a timeout does (over
//! HTTP/1.1; see [`stalled`] for HTTP/2).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::backend::InFlightGuard;
use crate::body::BoxError;
use crate::client::UpstreamBody;
use crate::config::UpstreamProtocol;
use crate::notes::RequestNotes;

/// The backend sent nothing of its response body for this long.
#[derive(Debug, thiserror::Error)]
#[error("backend {} sent nothing of its response body for {idle:?} (limits.backend_read_timeout)", backend.as_deref().unwrap_or("-"))]
pub struct BackendReadTimeout {
    /// `None` for an answer whose slot was no longer held.
    pub backend: Option<Arc<str>>,
    pub idle: Duration,
}

pin_project_lite::pin_project! {
    /// See the module's documentation.
    pub struct ResponseBody {
        #[pin]
        inner: UpstreamBody,
        // The slot, and whom a stall is charged to; `None` for an answer
        // whose slot was given back before it was chosen, and once the body
        // is over.
        held: Option<Held>,
        ended: bool,
        idle: Duration,
        // Made at the first wait for the backend and reset at each later
        // one: a body that arrives whole with its head never makes one, and
        // one that streams makes one (inside the body's own allocation).
        #[pin]
        waiting: Option<Sleep>,
        // Whether `waiting` times the current wait (it is kept, disarmed,
        // between waits).
        armed: bool,
    }
}

/// What the body holds for the backend while it streams.
struct Held {
    /// Kept for its drop, which frees the slot.
    _slot: InFlightGuard,
    /// The request's notes name the backend of the last try (whose body
    /// this is); a count on them is this request's alone, where one on the
    /// backend would be shared with every worker's requests.
    notes: Arc<RequestNotes>,
}

impl ResponseBody {
    pub fn new(inner: UpstreamBody, guard: InFlightGuard, notes: Arc<RequestNotes>, idle: Duration) -> Self {
        let held = Some(Held { _slot: guard, notes });
        ResponseBody { inner, held, ended: false, idle, waiting: None, armed: false }
    }

    /// A body whose backend slot is no longer held (an earlier try's answer,
    /// given to the client when no further try could start).
    pub fn without_slot(inner: UpstreamBody, idle: Duration) -> Self {
        ResponseBody { inner, held: None, ended: false, idle, waiting: None, armed: false }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.armed = false;
                if matches!(frame, None | Some(Err(_))) {
                    // Released as soon as the backend is done, not when hyper drops the body.
                    *this.ended = true;
                    this.held.take();
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timer = match this.waiting.as_mut().as_pin_mut() {
                    Some(timer) if *this.armed => timer,
                    Some(mut timer) => {
                        timer.as_mut().reset(tokio::time::Instant::now() + *this.idle);
                        timer
                    }
                    None => {
                        this.waiting.set(Some(tokio::time::sleep(*this.idle)));
                        this.waiting.as_mut().as_pin_mut().expect("just set")
                    }
                };
                *this.armed = true;
                if timer.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *this.ended = true;
                let backend = this.held.take().and_then(stalled);
                Poll::Ready(Some(Err(Box::new(BackendReadTimeout { backend, idle: *this.idle }))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stall past the bound: logged, and charged to the backend when it is
/// surely the backend's. Over HTTP/2 it may not be: the connection's flow
/// control window is shared by its streams, and a client that stops reading
/// one response leaves that window full for all the others.
fn stalled(held: Held) -> Option<Arc<str>> {
    let Held { _slot, notes } = held;
    // The body streams from the backend of the last try.
    let (route, tried) = (notes.route()?, notes.last_try()?);
    let (upstream, backend) = (tried.upstream(route), Arc::clone(&tried.backend(route).address));
    let charged = upstream.protocol == UpstreamProtocol::Http1;
    tracing::warn!(upstream = %upstream.name, %backend, charged,
        "backend stalled in the middle of a response body; cutting the response");
    if charged {
        upstream.charge_stalled_body(tried.index);
    }
    Some(backend)
}
