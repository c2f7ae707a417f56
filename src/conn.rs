//! One client connection as the rest of the proxy sees it: who the client is,
//! the connection's place under `max_connections`, the bounds on waiting
//! for a client that stops reading, and the pause after a failed accept
//! (shared by the proxy's listeners and the admin listener).
//!
//! [`ConnInfo`] (one `Arc` per connection) rides with every request in its
//! `notes::RequestNotes`. It owns the connection's [`ConnectionSlot`], so a WebSocket
//! tunnel that outlives hyper's connection keeps the slot (and the
//! `switchyard_connections_open` count) until the tunnel itself ends, and it
//! carries what a tunnel needs to join the listener's drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Sleep;
use tokio_util::task::TaskTracker;

/// After a failed `accept` (out of file descriptors, most often), waits before
/// the next one: the error would otherwise repeat at once, in a busy loop.
pub async fn accept_failed(listener: &str, error: &std::io::Error) {
    tracing::warn!(listener, %error, "accept failed; pausing accepts for 100ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Facts about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub listener: Arc<str>,
    /// The client IP, pre-rendered once per connection for `X-Forwarded-For`.
    pub client_ip_header: HeaderValue,
    /// Where an upgraded connection (WebSocket) goes on living.
    pub tunnels: Option<TunnelHome>,
    /// The client came over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
    /// The configured bind of the listener it came to: what a reload
    /// matches listeners by (their names may change under a running one).
    pub bind: Option<SocketAddr>,
    /// The client certificate the handshake verified, on a listener with
    /// `tls.client_auth`.
    pub client_cert: Option<crate::auth::ClientIdentity>,
}

impl ConnInfo {
    /// A connection with no listener around it (tests, benches): its tunnels
    /// are spawned on their own.
    pub fn new(client: SocketAddr, listener: Arc<str>) -> Self {
        let client_ip_header = HeaderValue::try_from(client.ip().to_string()).expect("an IP is a valid header value");
        ConnInfo { client, listener, client_ip_header, tunnels: None, tls: false, bind: None, client_cert: None }
    }
}

/// What a tunnel needs from its listener: the connection's slot to keep, the
/// tracker the listener's drain waits on, and the stop signal with its grace.
#[derive(Debug)]
pub struct TunnelHome {
    pub slot: Arc<ConnectionSlot>,
    pub tracker: TaskTracker,
    pub stopped: watch::Receiver<bool>,
    pub shutdown_grace: Duration,
    pub idle_timeout: Duration,
}

/// Holds a connection's place under `max_connections`, in
/// `switchyard_connections_open` and in the process's [`ConnectionCount`]
/// until the connection (and any tunnel made from it) ends, however it ends.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
    count: Arc<ConnectionCount>,
}

impl ConnectionSlot {
    pub fn new(permit: OwnedSemaphorePermit, open: metrics::Gauge, count: Arc<ConnectionCount>) -> Self {
        open.increment(1.0);
        count.opened();
        ConnectionSlot { _permit: permit, open, count }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
        self.count.closed();
    }
}

/// The process's open client connections, and their peak since it was last
/// taken: what tells a burst of connections from a steady load, however short
/// the burst (housekeeping, which trims the heap after one, looks once a
/// second).
#[derive(Debug, Default)]
pub struct ConnectionCount {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl ConnectionCount {
    fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The highest count since the last call, and the count now (which the
    /// next peak starts from).
    pub fn take_peak(&self) -> (usize, usize) {
        let open = self.open.load(Ordering::Relaxed);
        (self.peak.swap(open, Ordering::Relaxed).max(open), open)
    }
}

pin_project_lite::pin_project! {
    /// A client socket whose writes may wait at most `send_timeout` for the
    /// client to make room: a client that stops reading its response gets its
    /// connection closed, which releases the backend's slot. The timer exists
    /// only while a write is blocked, so a client that keeps up costs nothing.
    pub struct SendTimeoutIo<T> {
        #[pin]
        inner: T,
        send_timeout: Duration,
        blocked: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> SendTimeoutIo<T> {
    pub fn new(inner: T, send_timeout: Duration) -> Self {
        SendTimeoutIo { inner, send_timeout, blocked: None }
    }
}

/// Runs a write-side poll; while it is blocked, a timer started at the first
/// blocked poll decides when to give up.
fn bounded<R>(
    blocked: &mut Option<Pin<Box<Sleep>>>,
    send_timeout: Duration,
    cx: &mut Context<'_>,
    poll: Poll<io::Result<R>>,
) -> Poll<io::Result<R>> {
    if poll.is_ready() {
        *blocked = None;
        return poll;
    }
    let timer = blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
    if timer.as_mut().poll(cx).is_ready() {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read for client_send_timeout",
        )));
    }
    Poll::Pending
}

impl<T: AsyncRead> AsyncRead for SendTimeoutIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeoutIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        bounded(this.blocked, *this.send_timeout, cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        bounded(this.blocked, *this.send_timeout, cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_flush(cx);
        bounded(this.blocked, *this.send_timeout, cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_shutdown(cx);
        bounded(this.blocked, *this.send_timeout, cx, poll)
    }
}

/// Where a request that asked to upgrade its connection (WebSocket) gets the
/// client's side of it: the listener sends it once the 101 is written. In
/// the request's extensions (which want `Clone`: clones share the one
/// receiver); only HTTP/1.1 requests that ask to upgrade carry one.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<RewoundClient>>>>);

impl ClientUpgrade {
    pub fn new(receiver: tokio::sync::oneshot::Receiver<RewoundClient>) -> Self {
        ClientUpgrade(Arc::new(std::sync::Mutex::new(Some(receiver))))
    }

    /// The client's connection once the 101 has been written to it; `None`
    /// when the listener closed it instead (or a clone took it).
    pub async fn connection(self) -> Option<RewoundClient> {
        let receiver = self.0.lock().expect("never poisoned").take()?;
        receiver.await.ok()
    }
}

/// A stream with the bytes already read from it put back in front: after a
/// 101, what the other side sent after the head (both ways of a tunnel); on
/// a listener, the HTTP/2 preface read to tell the protocols apart.
pub struct Rewound<T> {
    io: T,
    early: bytes::Bytes,
}

/// A client connection, rewound.
pub type RewoundClient = Rewound<SendTimeoutIo<crate::tls::ClientStream>>;

impl<T> Rewound<T> {
    pub fn new(io: T, early: bytes::Bytes) -> Self {
        Rewound { io, early }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let take = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_the_timeout_fails_and_one_that_proceeds_does_not() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut io = SendTimeoutIo::new(near, Duration::from_secs(5));
        io.write_all(&[0; 16]).await.unwrap();
        // The far side reads within the bound: the next write proceeds.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut buf = [0; 16];
            tokio::io::AsyncReadExt::read_exact(&mut far, &mut buf).await.unwrap();
            far
        });
        io.write_all(&[0; 16]).await.unwrap();
        let _far = reader.await.unwrap();
        // Nobody reads now: the blocked write gives up after the bound.
        let error = io.write_all(&[0; 32]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
