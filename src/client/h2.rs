//! HTTP/2 over TLS to backends (`protocol: h2`): one multiplexed connection
//! per backend and TLS setting on each worker, opened on first use and again
//! when it has closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{SendError, TimedConnector, UpstreamBody};
use crate::body::ProxyBody;
use crate::config::tls::UpstreamTls;
use crate::upstream::Backend;

pub struct H2Connections {
    connector: TimedConnector,
    open: Mutex<HashMap<Arc<str>, SendRequest<ProxyBody>>>,
}

impl std::fmt::Debug for H2Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Connections").finish_non_exhaustive()
    }
}

impl H2Connections {
    pub fn new(connector: TimedConnector) -> Arc<H2Connections> {
        Arc::new(H2Connections { connector, open: Mutex::default() })
    }

    pub async fn send(
        &self,
        backend: &Backend,
        tls: &UpstreamTls,
        request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let open = self.open.lock().expect("never poisoned").get(&backend.pool_key).filter(|s| !s.is_closed()).cloned();
        let mut sender = match open {
            Some(sender) => sender,
            None => {
                let sender = self.connect(backend, tls).await?;
                self.open.lock().expect("never poisoned").insert(Arc::clone(&backend.pool_key), sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(|error| SendError::Request(Box::new(error)))?;
        match sender.send_request(request).await {
            Ok(response) => Ok(response.map(UpstreamBody::unpooled)),
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
