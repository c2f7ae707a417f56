//! TLS on listeners: the rustls server side built from a listener's
//! certificates (see `config::tls`), and the stream that is either plain TCP
//! or TLS over it (for clients here, for backends in `client`).
//!
//! TLS 1.2 and 1.3 only (rustls has nothing older), the certificate chosen by
//! SNI (exact name, then a wildcard one level up, then the first certificate),
//! ALPN from the config, session resumption by both a session cache and
//! tickets, client certificates verified against the listener's
//! `client_auth` CA (required, or optional and left to routes).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::auth::ClientAuthMode;
use crate::config::tls::ListenerTls;

/// Sessions a listener remembers for resumption without tickets.
const SESSION_CACHE: usize = 4096;

/// The server side of a listener's TLS settings.
pub fn server_config(tls: &ListenerTls) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(client_auth) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&client_auth.roots), provider);
            let verifier = match client_auth.mode {
                ClientAuthMode::Required => verifier,
                ClientAuthMode::Optional => verifier.allow_unauthenticated(),
            };
            // Loading the bundle checked it holds a usable certificate,
            // which is all the builder can refuse.
            builder.with_client_cert_verifier(verifier.build().expect("a loaded, non-empty CA bundle"))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(tls)));
    config.alpn_protocols = tls.alpn.iter().map(|protocol| protocol.id().to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    match rustls::crypto::ring::Ticketer::new() {
        Ok(ticketer) => config.ticketer = ticketer,
        Err(error) => tracing::warn!(%error, "TLS session tickets unavailable; resumption by session cache only"),
    }
    Arc::new(config)
}

/// Chooses a listener certificate by the name the client asked for.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn new(tls: &ListenerTls) -> Self {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        // The first certificate listing a name wins, as the config orders them.
        for certificate in &tls.certificates {
            for name in &certificate.names {
                let table = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name.clone()),
                };
                table.or_insert_with(|| Arc::clone(&certificate.certified));
            }
        }
        let default = Arc::clone(&tls.certificates.first().expect("validation requires a certificate").certified);
        SniResolver { exact, wildcard, default }
    }

    fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return Arc::clone(&self.default);
        };
        let wildcard = || name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent));
        Arc::clone(self.exact.get(&name).or_else(wildcard).unwrap_or(&self.default))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.for_name(hello.server_name()))
    }
}

/// A connection, plain TCP or TLS over it (`T`: the server or client side).
pub enum Stream<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client's connection to a listener.
pub type ClientStream = Stream<tokio_rustls::server::TlsStream<TcpStream>>;

/// The proxy's connection to a backend (requests and health checks).
pub type BackendStream = Stream<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
