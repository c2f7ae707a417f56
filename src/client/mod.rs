//! Pooled HTTP clients towards backends, one set per worker thread.
//!
//! HTTP/1.1 (plain or over TLS) is this crate's own client, pooled per worker
//! (`http1`); h2c through hyper-util's client, whose HTTP/2 connections
//! multiplex; HTTP/2 over TLS through one multiplexed connection per backend
//! and TLS setting (`h2`). A TLS handshake is part of connecting: it is bounded
//! by `connect_timeout`, and its failure is a connect failure. The clients
//! live for the whole process, outside the config snapshot, so a reload keeps
//! every warm keep-alive connection; pools are keyed by backend address, so
//! removed backends' idle connections simply expire.

mod h2;
pub(crate) mod http1;

pub use http1::{Upgraded, UpstreamBody};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::backend::Backend;
use crate::body::{BoxError, ProxyBody};
use crate::config::tls::UpstreamTls;
use crate::config::UpstreamProtocol;
use crate::tls::BackendStream;

/// Idle pooled connections are closed after this; backends commonly close idle
/// keep-alive connections after 60 s or more, so the proxy lets go first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// TCP keepalive on backend connections: the first probe after this much
/// silence, then one every `KEEPALIVE_INTERVAL`, and the connection is
/// declared dead after `KEEPALIVE_PROBES` unanswered ones (30 + 3 x 10 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

pub type HttpClient = Client<TimedConnector, ProxyBody>;

#[derive(Clone, Debug)]
pub struct UpstreamClients {
    http1: Arc<http1::Http1Pool>,
    h2c: HttpClient,
    h2: Arc<h2::H2Connections>,
    connect_timeout: ConnectTimeout,
}

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, unreachable, `connect_timeout`. Nothing was sent.
    Connect(BoxError),
    /// The connection failed during the exchange (or the request body did).
    Request(BoxError),
}

impl UpstreamClients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // A backend host that vanishes (powered off, partitioned) sends no
        // FIN or RST: probes find out within about a minute, for idle pooled
        // connections and for those waiting on a long job alike.
        http.set_keepalive(Some(KEEPALIVE_IDLE));
        http.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
        http.set_keepalive_retries(Some(KEEPALIVE_PROBES));
        http.enforce_http(true);
        let connect_timeout = ConnectTimeout::new(connect_timeout);
        let connector = TimedConnector { http, timeout: connect_timeout.clone() };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.timer(TokioTimer::new()).pool_timer(TokioTimer::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT);
        let http1 = http1::Http1Pool::new(connector.clone());
        let h2 = h2::H2Connections::new(connector.clone());
        let h2c = builder
            .http2_only(true)
            // Pings keep a long-idle h2 connection from being silently dropped by NAT.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_adaptive_window(true)
            .build(connector);
        UpstreamClients { http1, h2c, h2, connect_timeout }
    }

    /// Sends `request` to `backend` with the upstream's `protocol` and `tls`.
    /// For HTTP/1.1 the request target must be in origin form, with `Host`
    /// set; for HTTP/2 the URI is absolute. Over HTTP/1.1 the future is
    /// returned as it is; the HTTP/2 ones are boxed, so that the larger of
    /// them does not size every request's future.
    pub fn send<'a>(
        &'a self,
        protocol: UpstreamProtocol,
        tls: Option<&'a UpstreamTls>,
        backend: &'a Backend,
        request: http::Request<ProxyBody>,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a {
        type Boxed<'a> = Pin<Box<dyn Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a>>;
        match (protocol, tls) {
            (UpstreamProtocol::Http1, _) => Either::Left(self.http1.send(backend, tls, request)),
            (UpstreamProtocol::H2, Some(tls)) => {
                Either::Right(Box::pin(self.h2.send(backend, tls, request)) as Boxed<'a>)
            }
            // Validation pairs `h2` with `tls` and `h2c` without it.
            (UpstreamProtocol::H2c | UpstreamProtocol::H2, _) => Either::Right(Box::pin(async move {
                match self.h2c.request(request).await {
                    Ok(response) => Ok(response.map(UpstreamBody::http2)),
                    Err(error) if error.is_connect() => Err(SendError::Connect(Box::new(error))),
                    Err(error) => Err(SendError::Request(Box::new(error))),
                }
            }) as Boxed<'a>),
        }
    }

    /// Applies a reloaded `limits.connect_timeout` to connections opened from now on.
    pub fn set_connect_timeout(&self, timeout: Duration) {
        self.connect_timeout.set(timeout);
    }
}

/// `limits.connect_timeout`, shared by the connectors of every client and
/// changed in place by a reload.
#[derive(Clone, Debug)]
struct ConnectTimeout(Arc<AtomicU64>);

impl ConnectTimeout {
    fn new(timeout: Duration) -> Self {
        let this = ConnectTimeout(Arc::default());
        this.set(timeout);
        this
    }

    fn set(&self, timeout: Duration) {
        self.0.store(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// hyper-util's TCP connector under the current connect timeout. A refused
/// connection fails at once; the timeout bounds the wait for a host that does
/// not answer at all. Either failure is a connect error to the client, which
/// blames the backend.
#[derive(Clone, Debug)]
pub struct TimedConnector {
    http: HttpConnector,
    timeout: ConnectTimeout,
}

#[derive(Debug, thiserror::Error)]
#[error("no TCP connection within {0:?} (limits.connect_timeout)")]
pub struct ConnectTimedOut(Duration);

impl tower::Service<http::Uri> for TimedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let limit = self.timeout.get();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(ConnectTimedOut(limit).into()),
            }
        })
    }
}

/// A TCP connection to `authority` within the connect timeout, then TLS over
/// it when the upstream has it, within the same timeout: the connection the
/// HTTP/1.1 pool and the HTTP/2 connections are made on.
async fn connect(
    connector: &TimedConnector,
    authority: &http::uri::Authority,
    tls: Option<&UpstreamTls>,
) -> Result<BackendStream, SendError> {
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|error| SendError::Connect(Box::new(error)))?;
    let tcp = tower::Service::call(&mut connector.clone(), uri).await.map_err(SendError::Connect)?.into_inner();
    let Some(tls) = tls else {
        return Ok(BackendStream::Plain(tcp));
    };
    let name = tls.name_for(authority.host()).map_err(|error| SendError::Connect(Box::new(error)))?;
    let limit = connector.timeout.get();
    let handshake = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client_config)).connect(name, tcp);
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(stream)) => Ok(BackendStream::Tls(Box::new(stream))),
        Ok(Err(error)) => Err(SendError::Connect(Box::new(TlsHandshakeFailed(error)))),
        Err(_) => Err(SendError::Connect(Box::new(ConnectTimedOut(limit)))),
    }
}

/// Why a backend's TLS handshake failed (unknown CA, name mismatch, expired
/// certificate, a client certificate refused), as rustls says it.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub struct TlsHandshakeFailed(std::io::Error);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backend_connections_probe_a_silent_peer_with_tcp_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let clients = UpstreamClients::new(Duration::from_secs(5));
        let Ok(BackendStream::Plain(tcp)) = connect(&clients.http1.connector, &authority, None).await else {
            panic!("a plain connection")
        };
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }
}
