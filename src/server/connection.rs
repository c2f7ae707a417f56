//! One client connection: its PROXY header and TLS handshake (on its own
//! task, bounded), HTTP/1.x by our own loop (`http1`) or, when it starts with
//! the HTTP/2 preface, hyper's HTTP/2 server, what it is doing
//! ([`Activity`]), and its close when asked.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use super::stack::{ForHttp2Connection, WorkerStack};
use super::{http1, proxy_protocol};
use crate::config::Limits;
use crate::conn::{ConnInfo, RewoundClient, SendTimeoutIo, TunnelHome};
use crate::stream_timeout::StreamExecutor;
use crate::tls::ClientStream;

/// A connection just accepted, with what serving it needs.
pub(super) struct Accepted {
    pub stream: tokio::net::TcpStream,
    pub client: SocketAddr,
    /// The listener takes a PROXY protocol header first.
    pub proxy_protocol: bool,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
    pub home: TunnelHome,
    pub activity: Arc<Activity>,
    pub listener: Arc<str>,
    /// The listener's configured bind.
    pub bind: SocketAddr,
}

/// Serves one accepted connection to its end. The PROXY header and the TLS
/// handshake are read on the connection's own task, so a slow client never
/// holds up the accept loop; both are bounded. HTTP/1.x is served by our own
/// loop (`http1`), which hands a connection that starts with the HTTP/2
/// preface to hyper's HTTP/2 server.
pub(super) async fn serve(accepted: Accepted, protocols: Arc<Protocols>, stack: WorkerStack) {
    // Only what the connection's life needs of the limits: whatever lives
    // across an await is part of every connection's task.
    let Accepted { mut stream, mut client, proxy_protocol, tls, limits, home, activity, listener: name, bind } =
        accepted;
    let Limits {
        header_read_timeout, client_send_timeout: send_timeout, tls_handshake_timeout, max_header_bytes, ..
    } = limits;
    if proxy_protocol {
        match proxy_protocol::read_header(&mut stream, header_read_timeout).await {
            Ok(Some(named)) => client = named,
            // The balancer's own connection (its health check).
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(listener = %name, peer = %client, %error, "connection refused: no PROXY header");
                return;
            }
        }
    }
    let (stream, tls) = match tls {
        None => (ClientStream::Plain(stream), false),
        Some(config) => match handshake(config, stream, tls_handshake_timeout, &name).await {
            Some(stream) => (stream, true),
            None => return,
        },
    };
    let service = {
        let mut info = ConnInfo::new(client, name);
        info.tunnels = Some(home);
        info.tls = tls;
        info.bind = Some(bind);
        if let ClientStream::Tls(tls) = &stream {
            // Verified by the handshake; read once for every request of the connection.
            let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first());
            info.client_cert = leaf.and_then(|der| crate::auth::ClientIdentity::from_der(der));
        }
        stack.for_connection(Arc::new(info), Arc::clone(&activity))
    };
    let io = SendTimeoutIo::new(stream, send_timeout);
    let settings = http1::Http1Settings { header_read_timeout, max_header_bytes };
    match http1::serve(io, service.clone(), settings, Arc::clone(&activity)).await {
        http1::Ended::Closed => {}
        http1::Ended::Http2(io, preface) => {
            let io = TokioIo::new(RewoundClient::new(io, preface.freeze()));
            let connection =
                protocols.http2.serve_connection(io, TowerToHyperService::new(ForHttp2Connection(service)));
            // Boxed: an HTTP/1.1 connection's task need not have room for it.
            Box::pin(drive_connection(connection, activity, send_timeout)).await;
        }
    }
}

/// What serving a connection needs of the listener's limits beyond them.
pub(super) struct Protocols {
    http2: http2::Builder<StreamExecutor>,
}

pub(super) fn connection_builder(limits: &Limits) -> Arc<Protocols> {
    let mut http2 = http2::Builder::new(StreamExecutor { send_timeout: limits.client_send_timeout });
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    Arc::new(Protocols { http2 })
}

/// The server side of a TLS handshake, bounded by `timeout`; `None` (and the
/// connection closed) when it fails or takes too long.
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    stream: tokio::net::TcpStream,
    timeout: Duration,
    listener: &str,
) -> Option<ClientStream> {
    let accepted = tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(config).accept(stream)).await;
    let (result, stream) = match accepted {
        Ok(Ok(stream)) => ("ok", Some(ClientStream::Tls(Box::new(stream)))),
        Ok(Err(error)) => {
            tracing::debug!(listener, %error, "TLS handshake failed");
            ("failed", None)
        }
        Err(_) => ("timeout", None),
    };
    crate::metrics::tls_handshake(listener, result);
    stream
}

/// Serves one connection until it ends, asking it to finish gracefully
/// (complete the request in progress, then close) when the accept loop says
/// so: the listener stops, or no request has been active for `idle_timeout`.
/// Per wake this costs one flag read: the waker is handed over once.
///
/// A connection asked to close that has no response of ours in progress but
/// does not end is closed outright after `linger` (`client_send_timeout`):
/// an HTTP/2 client that gives its streams no window keeps their last bytes
/// in the connection's send buffers, and a graceful shutdown would wait for
/// them for ever.
async fn drive_connection(connection: ClientConnection, activity: Arc<Activity>, linger: Duration) {
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let mut registered: Option<Waker> = None;
    // Made only for a connection that lingers after it was asked to close.
    let mut cut: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let result = std::future::poll_fn(|cx| {
        if !closing {
            // Registered before the flag is read: a close asked in between still wakes us.
            if !registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                activity.waker.register(cx.waker());
                registered = Some(cx.waker().clone());
            }
            if activity.close.load(Ordering::Acquire) {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
        if let Poll::Ready(result) = std::future::Future::poll(connection.as_mut(), cx) {
            return Poll::Ready(result);
        }
        if !(closing && activity.is_idle()) {
            cut = None;
            return Poll::Pending;
        }
        let timer = cut.get_or_insert_with(|| Box::pin(tokio::time::sleep(linger)));
        match std::future::Future::poll(timer.as_mut(), cx) {
            Poll::Ready(()) => {
                tracing::debug!(?linger, "a closing connection's client took nothing more; closing it");
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// One HTTP/2 client connection as hyper serves it.
type ClientConnection =
    http2::Connection<TokioIo<RewoundClient>, TowerToHyperService<ForHttp2Connection>, StreamExecutor>;

/// Whether a connection has a request in progress and how many it finished,
/// and the accept loop's way to ask it to close.
pub(super) struct Activity {
    active: AtomicUsize,
    /// Requests finished so far.
    finished: AtomicUsize,
    close: AtomicBool,
    /// Its listener stopped accepting: HTTP/1.1 responses carry
    /// `Connection: close` (see `drain`).
    pub(super) draining: AtomicBool,
    waker: AtomicWaker,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            active: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            close: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Has the connection finish its request in progress, then close.
    pub(super) fn ask_to_close(&self) {
        self.close.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether the accept loop asked the connection to close.
    pub(super) fn close_asked(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    /// `waker` is woken when the connection is asked to close.
    pub(super) fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    pub(super) fn request_started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn request_finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }

    pub(super) fn finished(&self) -> usize {
        self.finished.load(Ordering::Relaxed)
    }
}
