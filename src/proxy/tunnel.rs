//! Upgraded connections (WebSocket): once the backend answers 101, bytes are
//! copied both ways until either side closes, nothing moves for
//! `tunnel_idle_timeout`, or the listener's drain runs out.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::backend::InFlightGuard;
use crate::client::Upgraded;
use crate::conn::{ClientUpgrade, ConnInfo};

/// Copies bytes both ways between an upgraded client connection and its
/// backend until either side closes, nothing moves for `tunnel_idle_timeout`,
/// or the listener stops and its `shutdown_grace` runs out. Holds the backend's
/// slot and, through `conn`, the client connection's place under
/// `max_connections` until then.
pub(super) async fn tunnel(client: ClientUpgrade, backend: Upgraded, _slot: InFlightGuard, conn: Arc<ConnInfo>) {
    let Some(client) = client.connection().await else {
        tracing::debug!("upgrade failed: the client connection closed before the 101 was written");
        return;
    };
    let home = conn.tunnels.as_ref();
    let idle_timeout = home.map_or(crate::config::Limits::default().tunnel_idle_timeout, |h| h.idle_timeout);
    let last_read = Arc::new(AtomicU64::new(crate::clock::nanos_since_epoch()));
    let mut client = ReadActivity { inner: client, last_read: Arc::clone(&last_read) };
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
