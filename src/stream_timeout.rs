//! `client_send_timeout` for each HTTP/2 stream: a response the client gives
//! no room to (a stream window of 0, no WINDOW_UPDATE) is reset after that
//! long, which frees its backend slot, while the connection's other streams
//! go on.
//!
//! On HTTP/1.1 the bound is on the socket (`conn::SendTimeoutIo`). On HTTP/2
//! the socket keeps moving (PINGs, other streams) while one stream is stuck,
//! and hyper does not even poll a stream's body while the stream has no send
//! window: nothing on the body's side ever runs to notice. So the bound
//! lives around the stream's whole task: hyper spawns each stream through
//! [`StreamExecutor`], which wraps it in [`Watched`]. While it polls a
//! stream, the response's own layers say what they did in a thread-local
//! ([`note`]): the head is ready, the body handed over data, or the body
//! waits for its backend. A stream whose last word was "head ready" or
//! "data handed over" waits on its client; if it stays that way for the
//! timeout, `Watched` drops the stream's task, and h2 resets the stream
//! with CANCEL. A body waiting for its backend is bounded by
//! `backend_read_timeout` instead, and never by this.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// What a response's layers did while its stream was polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// The response head is ready to go.
    HeadReady,
    /// The body handed a frame over to be sent.
    Handed,
    /// The body waits for its backend.
    AwaitingBackend,
}

thread_local! {
    /// The last event of the stream being polled on this thread, if any.
    static LAST: Cell<Option<StreamEvent>> = const { Cell::new(None) };
}

/// Says what the response being polled just did. Outside a watched stream
/// (HTTP/1.1) nobody reads it: the next watched poll starts afresh.
pub fn note(event: StreamEvent) {
    LAST.set(Some(event));
}

/// hyper's executor for a listener's HTTP/2 connections: every task it is
/// given (each stream's) runs under a [`Watched`] bound.
#[derive(Clone, Copy, Debug)]
pub struct StreamExecutor {
    pub send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Watched::new(future, self.send_timeout));
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped (and the stream reset) once it has waited on
    /// its client for `limit` without progress.
    pub struct Watched<F> {
        #[pin]
        inner: Option<F>,
        // Made the first time the stream waits on its client.
        #[pin]
        timer: Option<Sleep>,
        limit: Duration,
        // The stream waits on its client: the timer runs.
        on_client: bool,
    }
}

impl<F> Watched<F> {
    pub fn new(inner: F, limit: Duration) -> Self {
        Watched { inner: Some(inner), timer: None, limit, on_client: false }
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else { return Poll::Ready(()) };
        LAST.set(None);
        if inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        match LAST.take() {
            // Waiting for the client to take what is ready: timed from now,
            // each piece handed over being progress.
            Some(StreamEvent::HeadReady | StreamEvent::Handed) => {
                let deadline = tokio::time::Instant::now() + *this.limit;
                match this.timer.as_mut().as_pin_mut() {
                    Some(timer) => timer.reset(deadline),
                    None => this.timer.set(Some(tokio::time::sleep_until(deadline))),
                }
                *this.on_client = true;
            }
            Some(StreamEvent::AwaitingBackend) => *this.on_client = false,
            // Woken for something else (a window update too small to send
            // anything, the timer itself): still where it was.
            None => {}
        }
        if !*this.on_client {
            return Poll::Pending;
        }
        let timer = this.timer.as_mut().as_pin_mut().expect("armed when waiting on the client");
        if timer.poll(cx).is_pending() {
            return Poll::Pending;
        }
        tracing::debug!(limit = ?this.limit, "HTTP/2 client gave a response no room to be sent; resetting the stream");
        // Dropping the task drops its send stream: h2 sends RST_STREAM
        // (CANCEL), and the response body, with its backend slot, goes too.
        this.inner.set(None);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's task as hyper drives one that gets stuck: its layers note
    /// `event` at the first poll, and nothing moves after that.
    struct Stuck(Option<StreamEvent>);

    impl Future for Stuck {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            if let Some(event) = self.0.take() {
                note(event);
            }
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_its_client_ends_at_the_limit_and_one_waiting_on_its_backend_does_not() {
        let limit = Duration::from_secs(5);
        let on_client = tokio::time::timeout(limit * 2, Watched::new(Stuck(Some(StreamEvent::Handed)), limit)).await;
        assert!(on_client.is_ok(), "dropped at the limit");
        let on_backend =
            tokio::time::timeout(limit * 10, Watched::new(Stuck(Some(StreamEvent::AwaitingBackend)), limit)).await;
        assert!(on_backend.is_err(), "a backend's wait is not the client's");
    }
}
