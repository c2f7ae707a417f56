//! Pooled HTTP clients towards backends: one set per worker thread, and
//! one for the health checks.
//!
//! Every connection is opened by the one [`Connector`] (TCP, keepalive,
//! TLS, `connect_timeout`); HTTP/1.1 goes through this crate's own pool
//! (`http1`), HTTP/2 with or without TLS through one multiplexed connection
//! per backend and TLS setting (`h2`). A TLS handshake is part of connecting:
//! it is bounded by `connect_timeout`, and its failure is a connect failure.
//! The clients live for the whole process, outside the config snapshot, so a
//! reload keeps every warm keep-alive connection; pools are keyed by backend
//! address and TLS setting, so removed backends' idle connections simply
//! expire.

mod connect;
mod h2;
pub(crate) mod http1;

pub use connect::{ConnectError, Connector};
pub use http1::{Upgraded, UpstreamBody};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;

use crate::backend::Backend;
use crate::body::{BoxError, ProxyBody};
use crate::config::tls::UpstreamTls;
use crate::config::UpstreamProtocol;

#[derive(Clone, Debug)]
pub struct UpstreamClients {
    connector: Connector,
    http1: Arc<http1::Http1Pool>,
    h2: Arc<h2::H2Pool>,
}

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, unreachable, `connect_timeout`, TLS refused.
    /// Nothing was sent.
    /// Shared by the requests that waited for the same HTTP/2 connect.
    Connect(Arc<ConnectError>),
    /// The connection failed during the exchange (or the request body did).
    Request(BoxError),
}

/// Where a request goes: the key of its connections in the pools
/// ([`crate::backend::pool_key`]), the address to connect to and the TLS to
/// connect with.
#[derive(Clone, Copy)]
pub struct Destination<'a> {
    pub key: &'a Arc<str>,
    pub authority: &'a http::uri::Authority,
    pub tls: Option<&'a UpstreamTls>,
}

/// What forwarding sends a try through: the worker's [`UpstreamClients`],
/// or, in forwarding's unit tests, scripted backends on paused time.
pub trait SendToBackend: Send + Sync + 'static {
    /// Sends `request` to `backend` with the upstream's `protocol` and `tls`.
    /// For HTTP/1.1 the request target must be in origin form, with `Host`
    /// set; for HTTP/2 the URI is absolute.
    fn send<'a>(
        &'a self,
        protocol: UpstreamProtocol,
        tls: Option<&'a UpstreamTls>,
        backend: &'a Backend,
        request: http::Request<ProxyBody>,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a;
}

impl SendToBackend for UpstreamClients {
    /// Over HTTP/1.1 the future is returned as it is; the HTTP/2 one is
    /// boxed, so that the larger of them does not size every request's future.
    fn send<'a>(
        &'a self,
        protocol: UpstreamProtocol,
        tls: Option<&'a UpstreamTls>,
        backend: &'a Backend,
        request: http::Request<ProxyBody>,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a {
        type Boxed<'a> = Pin<Box<dyn Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a>>;
        let to = Destination { key: &backend.pool_key, authority: &backend.authority, tls };
        match protocol {
            UpstreamProtocol::Http1 => Either::Left(self.http1.send(to, request)),
            // Validation pairs `h2` with `tls` and `h2c` without it.
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => {
                Either::Right(Box::pin(self.h2.send(to, request)) as Boxed<'a>)
            }
        }
    }
}

impl UpstreamClients {
    pub fn new(connect_timeout: Duration) -> Self {
        let connector = Connector::new(connect_timeout);
        let http1 = http1::Http1Pool::new(connector.clone());
        let h2 = h2::H2Pool::new(connector.clone());
        UpstreamClients { connector, http1, h2 }
    }

    /// The HTTP/1.1 pool, which health checks use directly.
    pub fn http1(&self) -> &http1::Http1Pool {
        &self.http1
    }

    /// The HTTP/2 pool, which gRPC health checks use directly.
    pub fn h2(&self) -> &h2::H2Pool {
        &self.h2
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Applies a reloaded `limits.connect_timeout` to connections opened from now on.
    pub fn set_connect_timeout(&self, timeout: Duration) {
        self.connector.set_timeout(timeout);
    }
}

/// Test servers on `127.0.0.1` that count the connections they accept.
#[cfg(test)]
pub(crate) mod test_server {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Accepts on a free port and hands each connection to `serve`: the
    /// address, and the count of connections accepted so far.
    pub async fn counting<S, F>(serve: S) -> (Arc<str>, Arc<AtomicUsize>)
    where
        S: Fn(tokio::net::TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Arc<str> = listener.local_addr().unwrap().to_string().into();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (address, accepted)
    }
}
