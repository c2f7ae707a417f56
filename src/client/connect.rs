//! The one way a connection to a backend is opened, for requests and health
//! probes alike: TCP with the proxy's socket options, then TLS when the
//! upstream has it, the whole within `limits.connect_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::tls::UpstreamTls;
use crate::tls::BackendStream;

/// TCP keepalive on backend connections: the first probe after this much
/// silence, then one every `KEEPALIVE_INTERVAL`, and the connection is
/// declared dead after `KEEPALIVE_PROBES` unanswered ones (30 + 3 x 10 s). A
/// backend host that vanishes (powered off, partitioned) sends no FIN or RST:
/// this finds out within about a minute, for idle pooled connections and for
/// those waiting on a long job alike.
pub(super) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(super) const KEEPALIVE_PROBES: u32 = 3;

/// Opens backend connections. Clones share the connect timeout, which a
/// reload changes in place for connections opened from then on.
#[derive(Clone, Debug)]
pub struct Connector {
    timeout: Arc<AtomicU64>,
}

/// Why no connection was made. Nothing was sent to the backend.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("connection reset")]
    Reset,
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("no connection within {0:?} (limits.connect_timeout)")]
    TimedOut(Duration),
    #[error("no TLS server name: {0}")]
    TlsName(#[source] rustls::pki_types::InvalidDnsNameError),
    /// The certificate was refused (unknown CA, name mismatch, expired) or
    /// ours was, as rustls says it: configuration, not a passing failure.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] std::io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    Http2Handshake(#[source] hyper::Error),
}

impl From<std::io::Error> for ConnectError {
    fn from(error: std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            std::io::ErrorKind::ConnectionReset => ConnectError::Reset,
            _ => ConnectError::Io(error),
        }
    }
}

impl Connector {
    pub fn new(timeout: Duration) -> Self {
        let connector = Connector { timeout: Arc::default() };
        connector.set_timeout(timeout);
        connector
    }

    /// Applies a reloaded `limits.connect_timeout` to connections opened from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.store(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout.load(Ordering::Relaxed))
    }

    /// A connection to `authority`, over TLS with `tls`. A refused connection
    /// fails at once; the timeout bounds the wait for a host that does not
    /// answer at all, and a TLS handshake that does not finish.
    pub async fn connect(
        &self,
        authority: &http::uri::Authority,
        tls: Option<&UpstreamTls>,
    ) -> Result<BackendStream, ConnectError> {
        let limit = self.timeout();
        let deadline = tokio::time::Instant::now() + limit;
        let connecting = async {
            let tcp = tcp(authority, deadline).await?;
            let Some(tls) = tls else {
                return Ok(BackendStream::Plain(tcp));
            };
            let name = tls.name_for(authority.host()).map_err(ConnectError::TlsName)?;
            match tokio_rustls::TlsConnector::from(Arc::clone(&tls.client_config)).connect(name, tcp).await {
                Ok(stream) => Ok(BackendStream::Tls(Box::new(stream))),
                // What rustls refused (a certificate, a protocol) is the
                // handshake's failure; a reset or a close on the way is the
                // connection's.
                Err(error) if error.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
                    Err(ConnectError::TlsHandshake(error))
                }
                Err(error) => Err(error.into()),
            }
        };
        tokio::time::timeout_at(deadline, connecting).await.unwrap_or(Err(ConnectError::TimedOut(limit)))
    }
}

/// TCP to an address (as configured backends and discovery give them) or a
/// name, with Nagle off (requests and heads are written whole) and keepalive
/// on. A name's addresses are tried in turn, the address families
/// alternating (RFC 8305), each with an equal share of the time left, so
/// that one address which drops connections does not use up the whole
/// `connect_timeout` (hyper-util's connector shares it the same way).
async fn tcp(authority: &http::uri::Authority, deadline: tokio::time::Instant) -> Result<TcpStream, ConnectError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let tcp = match literal.parse::<std::net::IpAddr>() {
        Ok(ip) => TcpStream::connect(SocketAddr::new(ip, port)).await?,
        Err(_) => {
            let addresses = alternate_families(tokio::net::lookup_host((host, port)).await?.collect());
            let mut failed = ConnectError::Io(std::io::Error::other(format!("no address for {host}")));
            let mut connected = None;
            for (index, address) in addresses.iter().enumerate() {
                let share =
                    deadline.saturating_duration_since(tokio::time::Instant::now()) / (addresses.len() - index) as u32;
                match tokio::time::timeout(share, TcpStream::connect(address)).await {
                    Ok(Ok(tcp)) => {
                        connected = Some(tcp);
                        break;
                    }
                    Ok(Err(error)) => failed = error.into(),
                    Err(_) => failed = ConnectError::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                }
            }
            connected.ok_or(failed)?
        }
    };
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
    Ok(tcp)
}

/// `addresses` reordered so the families alternate, starting with the
/// resolver's first (RFC 8305, section 4).
fn alternate_families(addresses: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addresses.first().map(SocketAddr::is_ipv6) else { return addresses };
    let (mut preferred, mut other): (Vec<_>, Vec<_>) = addresses.into_iter().partition(|a| a.is_ipv6() == first);
    let mut alternated = Vec::with_capacity(preferred.len() + other.len());
    preferred.reverse();
    other.reverse();
    while !preferred.is_empty() || !other.is_empty() {
        alternated.extend(preferred.pop());
        alternated.extend(other.pop());
    }
    alternated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backend_connections_probe_a_silent_peer_with_tcp_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let Ok(BackendStream::Plain(tcp)) = Connector::new(Duration::from_secs(5)).connect(&authority, None).await
        else {
            panic!("a plain connection")
        };
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    #[test]
    fn a_names_addresses_alternate_families() {
        let v6 = |n: u16| SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), n);
        let v4 = |n: u16| SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), n);
        assert_eq!(alternate_families(vec![v6(1), v6(2), v6(3), v4(4)]), [v6(1), v4(4), v6(2), v6(3)]);
        assert_eq!(alternate_families(vec![v4(1), v4(2), v6(3), v6(4)]), [v4(1), v6(3), v4(2), v6(4)]);
        assert_eq!(alternate_families(vec![]), []);
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_refused_at_once() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let authority: http::uri::Authority = format!("127.0.0.1:{port}").parse().unwrap();
        let error = Connector::new(Duration::from_secs(60)).connect(&authority, None).await.err().unwrap();
        assert!(matches!(error, ConnectError::Refused), "{error:?}");
        assert_eq!(error.to_string(), "connection refused");
    }

    /// A listener whose accept queue is full leaves a new connection's SYN
    /// unanswered (Linux drops it), as a powered-off host would.
    #[tokio::test]
    async fn a_host_that_does_not_answer_meets_the_timeout_in_force() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        socket.listen(0).unwrap();
        let address = socket.local_addr().unwrap().as_socket().unwrap();
        let authority: http::uri::Authority = address.to_string().parse().unwrap();
        let connector = Connector::new(Duration::from_secs(60));
        // Fill the queue: once it is full, a connection is left unanswered
        // (a dropped SYN is sent again only after a second).
        let mut held = Vec::new();
        while let Ok(connected) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address)).await {
            held.push(connected.unwrap());
            assert!(held.len() < 64, "the accept queue never filled");
        }
        connector.clone().set_timeout(Duration::from_millis(200));
        let error = connector.connect(&authority, None).await.err().unwrap();
        assert!(matches!(error, ConnectError::TimedOut(limit) if limit == Duration::from_millis(200)), "{error:?}");
    }
}
