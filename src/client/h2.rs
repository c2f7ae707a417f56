//! HTTP/2 over TLS to backends (`protocol: h2`): one multiplexed connection
//! per backend and TLS setting on each worker, opened on first use and again
//! when it has closed. A connection unused for 40-50 s is let go (as the
//! HTTP/1.1 pool does), so backends removed by a reload leave no connection
//! behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::{Request, Response};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{SendError, TimedConnector, UpstreamBody};
use crate::backend::Backend;
use crate::body::ProxyBody;
use crate::config::tls::UpstreamTls;

pub struct H2Connections {
    me: Weak<H2Connections>,
    connector: TimedConnector,
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

impl std::fmt::Debug for H2Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Connections").finish_non_exhaustive()
    }
}

impl H2Connections {
    pub fn new(connector: TimedConnector) -> Arc<H2Connections> {
        Arc::new_cyclic(|me| H2Connections {
            me: me.clone(),
            connector,
            open: Mutex::default(),
            sweeps: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    pub async fn send(
        &self,
        backend: &Backend,
        tls: &UpstreamTls,
        request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let now = self.sweeps.load(Ordering::Relaxed);
        let open = self.open.lock().expect("never poisoned").get_mut(&backend.pool_key).and_then(|open| {
            open.used = now;
            (!open.sender.is_closed()).then(|| open.sender.clone())
        });
        let mut sender = match open {
            Some(sender) => sender,
            None => {
                // Boxed: the rare path, kept out of every request's future.
                let sender = Box::pin(self.connect(backend, tls)).await?;
                self.open
                    .lock()
                    .expect("never poisoned")
                    .insert(Arc::clone(&backend.pool_key), Open { sender: sender.clone(), used: now });
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

    async fn connect(&self, backend: &Backend, tls: &UpstreamTls) -> Result<SendRequest<ProxyBody>, SendError> {
        let stream = super::connect(&self.connector, &backend.authority, Some(tls)).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings keep a long-idle connection from being silently dropped by NAT.
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Connect(Box::new(error)))?;
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
async fn sweep(connections: Weak<H2Connections>) {
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
