//! Pooled HTTP clients towards backends, one per upstream protocol.
//!
//! The clients live for the whole process, outside the config snapshot, so a
//! reload keeps every warm keep-alive connection; pools are keyed by backend
//! address, so removed backends' idle connections simply expire.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::{BoxError, ProxyBody};
use crate::config::UpstreamProtocol;

/// Idle pooled connections are closed after this; backends commonly close idle
/// keep-alive connections after 60 s or more, so the proxy lets go first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

pub type HttpClient = Client<TimedConnector, ProxyBody>;

#[derive(Clone, Debug)]
pub struct UpstreamClients {
    http1: HttpClient,
    h2c: HttpClient,
    connect_timeout: ConnectTimeout,
}

impl UpstreamClients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(true);
        let connect_timeout = ConnectTimeout::new(connect_timeout);
        let connector = TimedConnector { http, timeout: connect_timeout.clone() };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.timer(TokioTimer::new()).pool_timer(TokioTimer::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT);
        let http1 = builder.clone().build(connector.clone());
        let h2c = builder
            .http2_only(true)
            // Pings keep a long-idle h2 connection from being silently dropped by NAT.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_adaptive_window(true)
            .build(connector);
        UpstreamClients { http1, h2c, connect_timeout }
    }

    pub fn for_protocol(&self, protocol: UpstreamProtocol) -> &HttpClient {
        match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            // `h2` (TLS) is rejected by config validation until upstream TLS exists.
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => &self.h2c,
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
