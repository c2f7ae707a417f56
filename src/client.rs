//! Pooled HTTP clients towards backends, one per upstream protocol.
//!
//! The clients live for the whole process, outside the config snapshot, so a
//! reload keeps every warm keep-alive connection; pools are keyed by backend
//! address, so removed backends' idle connections simply expire.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::config::UpstreamProtocol;

/// How long a TCP connect to a backend may take. A refused connection fails at
/// once; this bounds the wait for a host that does not answer at all.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this; backends commonly close idle
/// keep-alive connections after 60 s or more, so the proxy lets go first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

pub type HttpClient = Client<HttpConnector, ProxyBody>;

#[derive(Clone, Debug)]
pub struct UpstreamClients {
    http1: HttpClient,
    h2c: HttpClient,
}

impl UpstreamClients {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.timer(TokioTimer::new()).pool_timer(TokioTimer::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT);
        let http1 = builder.clone().build(connector.clone());
        let h2c = builder
            .http2_only(true)
            // Pings keep a long-idle h2 connection from being silently dropped by NAT.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_adaptive_window(true)
            .build(connector);
        UpstreamClients { http1, h2c }
    }

    pub fn for_protocol(&self, protocol: UpstreamProtocol) -> &HttpClient {
        match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            // `h2` (TLS) is rejected by config validation until upstream TLS exists.
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => &self.h2c,
        }
    }
}

impl Default for UpstreamClients {
    fn default() -> Self {
        Self::new()
    }
}
