//! HTTP/1.1 connections to backends, pooled per worker thread.
//!
//! Each worker has its own pool (see `server::workers`), so the lock here is
//! never contended. A request takes an idle connection of its backend (the most
//! recently used, whose TCP state is warmest) or opens one, and the connection
//! goes back to the pool the moment its response body has been read to the end,
//! carried by the body itself ([`UpstreamBody`]): no task per request waits to
//! return it, as hyper-util's legacy pool does. A response body dropped before
//! its end takes its connection with it (its state is unknown). A request that
//! finds its pooled connection closed before anything was sent goes out again
//! on a fresh one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::{SendError, TimedConnector};
use crate::body::ProxyBody;
use crate::config::tls::UpstreamTls;
use crate::upstream::Backend;

/// Idle connections are swept every `SWEEP`; one left idle for `MAX_IDLE_SWEEPS`
/// sweeps (40-50 s) is closed, before backends commonly close theirs (60 s+).
pub(super) const SWEEP: Duration = Duration::from_secs(10);
pub(super) const MAX_IDLE_SWEEPS: u64 = 4;

pub struct Http1Pool {
    me: Weak<Http1Pool>,
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
    connector: TimedConnector,
    /// Sweeps done so far; idle connections remember the count they came back at.
    sweeps: AtomicU64,
    sweeping: AtomicBool,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since_sweep: u64,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").finish_non_exhaustive()
    }
}

impl Http1Pool {
    pub fn new(connector: TimedConnector) -> Arc<Http1Pool> {
        Arc::new_cyclic(|me| Http1Pool {
            me: me.clone(),
            idle: Mutex::default(),
            connector,
            sweeps: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (origin-form target, `Host` set) to `backend`, on a
    /// pooled connection or a new one (over TLS with `tls`).
    pub async fn send(
        &self,
        backend: &Backend,
        tls: Option<&UpstreamTls>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let key = &backend.pool_key;
        loop {
            let (mut sender, pooled) = match self.checkout(key) {
                Some(sender) => (sender, true),
                None => (self.connect(&backend.authority, tls).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let home = self.me.upgrade().map(|pool| (pool, Arc::clone(key), sender));
                    return Ok(response.map(|body| UpstreamBody { inner: body, home }));
                }
                Err(mut error) => match error.take_message() {
                    // A pooled connection that closed before the request left:
                    // nothing reached the backend, so it goes out on a new one.
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(SendError::Request(Box::new(error.into_error()))),
                },
            }
        }
    }

    fn checkout(&self, backend: &str) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("never poisoned");
        let connections = idle.get_mut(backend)?;
        let mut settling = Vec::new();
        let found = loop {
            let Some(idle) = connections.pop() else { break None };
            if idle.sender.is_ready() {
                break Some(idle.sender);
            }
            if !idle.sender.is_closed() {
                // Its last response has just ended and the connection task has
                // not caught up yet: ready in a moment, so keep it.
                settling.push(idle);
            }
        };
        connections.extend(settling);
        found
    }

    fn put(&self, backend: Arc<str>, sender: SendRequest<ProxyBody>) {
        let since_sweep = self.sweeps.load(Ordering::Relaxed);
        self.idle.lock().expect("never poisoned").entry(backend).or_default().push(Idle { sender, since_sweep });
    }

    async fn connect(
        &self,
        authority: &http::uri::Authority,
        tls: Option<&UpstreamTls>,
    ) -> Result<SendRequest<ProxyBody>, SendError> {
        let stream = super::connect(&self.connector, authority, tls).await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Connect(Box::new(error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "backend connection ended with an error");
            }
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(self.me.clone()));
        }
        Ok(sender)
    }
}

/// Closes connections idle too long, while the pool lives.
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = pool.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = pool.idle.lock().expect("never poisoned");
        idle.retain(|_, connections| {
            connections.retain(|c| !c.sender.is_closed() && now - c.since_sweep < MAX_IDLE_SWEEPS);
            !connections.is_empty()
        });
    }
}

pin_project_lite::pin_project! {
    /// A backend's response body; over HTTP/1.1 it brings its connection back
    /// to the pool when read to the end.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        home: Option<(Arc<Http1Pool>, Arc<str>, SendRequest<ProxyBody>)>,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            // An empty body (204, 304, HEAD, `Content-Length: 0`) may never be
            // polled: it is over all the same.
            let this = this.project();
            if this.inner.is_end_stream() {
                if let Some((pool, backend, sender)) = this.home.take() {
                    pool.put(backend, sender);
                }
            }
        }
    }
}

impl UpstreamBody {
    /// A body whose connection is not pooled here (HTTP/2 multiplexes).
    pub fn unpooled(inner: Incoming) -> Self {
        UpstreamBody { inner, home: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                if let Some((pool, backend, sender)) = this.home.take() {
                    pool.put(backend, sender);
                }
            }
            Poll::Ready(Some(Err(_))) => drop(this.home.take()),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
