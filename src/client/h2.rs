//! HTTP/2 to backends, over TLS (`protocol: h2`) or not (`h2c`): one
//! multiplexed connection per backend and TLS setting in each pool, opened on
//! first use and again when it has closed. A connection unused for 40-50 s is
//! let go (as the HTTP/1.1 pool does), so backends removed by a reload leave
//! no connection behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::{Request, Response};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::connect::ConnectError;
use super::{Connector, Destination, SendError, UpstreamBody};
use crate::body::ProxyBody;

/// Pings keep a long-idle connection from being silently dropped by NAT.
const KEEPALIVE_PING: std::time::Duration = std::time::Duration::from_secs(30);

pub struct H2Pool {
    me: Weak<H2Pool>,
    connector: Connector,
    /// Keyed as the HTTP/1.1 pool is (see there).
    open: Mutex<HashMap<Arc<str>, Open, foldhash::fast::RandomState>>,
    sweeps: AtomicU64,
    sweeping: AtomicBool,
}

/// A connection with the sweep count at its last use.
struct Open {
    sender: SendRequest<ProxyBody>,
    used: u64,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").finish_non_exhaustive()
    }
}

impl H2Pool {
    pub fn new(connector: Connector) -> Arc<H2Pool> {
        Arc::new_cyclic(|me| H2Pool {
            me: me.clone(),
            connector,
            open: Mutex::default(),
            sweeps: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (its URI absolute) to `to`.
    pub async fn send(
        &self,
        to: Destination<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let now = self.sweeps.load(Ordering::Relaxed);
        let open = self.open.lock().expect("never poisoned").get_mut(to.key).and_then(|open| {
            open.used = now;
            (!open.sender.is_closed()).then(|| open.sender.clone())
        });
        let mut sender = match open {
            Some(sender) => sender,
            None => {
                // Boxed: the rare path, kept out of every request's future.
                let sender = Box::pin(self.connect(to)).await.map_err(SendError::Connect)?;
                self.open
                    .lock()
                    .expect("never poisoned")
                    .insert(Arc::clone(to.key), Open { sender: sender.clone(), used: now });
                if !self.sweeping.swap(true, Ordering::Relaxed) {
                    tokio::spawn(sweep(self.me.clone()));
                }
                sender
            }
        };
        sender.ready().await.map_err(|error| SendError::Request(Box::new(error)))?;
        match sender.send_request(request).await {
            Ok(response) => Ok(response.map(UpstreamBody::http2)),
            Err(error) => Err(SendError::Request(Box::new(error))),
        }
    }

    /// Lets go of `key`'s connection: the next request opens a new one.
    pub fn forget(&self, key: &str) {
        self.open.lock().expect("never poisoned").remove(key);
    }

    async fn connect(&self, to: Destination<'_>) -> Result<SendRequest<ProxyBody>, ConnectError> {
        let stream = self.connector.connect(to.authority, to.tls).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_PING)
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Http2Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "backend HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Lets go of connections unused for `MAX_IDLE_SWEEPS` sweeps (or closed),
/// while the connections live; a connection whose last handle is dropped
/// closes once its streams are done.
async fn sweep(connections: Weak<H2Pool>) {
    loop {
        tokio::time::sleep(super::http1::SWEEP).await;
        let Some(connections) = connections.upgrade() else { return };
        let now = connections.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        connections
            .open
            .lock()
            .expect("never poisoned")
            .retain(|_, open| !open.sender.is_closed() && now - open.used < super::http1::MAX_IDLE_SWEEPS);
    }
}
