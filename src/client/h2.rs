//! HTTP/2 to backends, over TLS (`protocol: h2`) or not (`h2c`): one
//! multiplexed connection per backend and TLS setting in each pool, opened on
//! first use and again when it has closed. Requests that find none while one
//! is being opened wait for that one rather than each opening their own. A
//! connection unused for 30-40 s is let go (as the HTTP/1.1 pool does), so
//! backends removed by a reload leave no connection behind.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::{FutureExt, Shared};
use http::{Request, Response};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::connect::ConnectError;
use super::{Connector, Destination, SendError, UpstreamBody};
use crate::body::ProxyBody;
use crate::config::tls::UpstreamTls;

/// Pings keep a long-idle connection from being silently dropped by NAT.
const KEEPALIVE_PING: std::time::Duration = std::time::Duration::from_secs(30);

pub struct H2Pool {
    me: Weak<H2Pool>,
    connector: Connector,
    /// Keyed as the HTTP/1.1 pool is (see there).
    open: Mutex<HashMap<Arc<str>, Slot, foldhash::fast::RandomState>>,
    /// Numbers connects, so that one settles only its own slot.
    connects: AtomicU64,
    sweeps: AtomicU64,
    sweeping: AtomicBool,
}

/// A backend's connection, or the connect under way that every request
/// finding none waits for.
enum Slot {
    Open { sender: SendRequest<ProxyBody>, used: u64 },
    Connecting { connecting: Connecting, id: u64 },
}

/// A connect under way: a task of its own, so it finishes (and puts its
/// connection in place) even when every request waiting for it has gone.
type Connecting = Shared<Pin<Box<dyn Future<Output = Result<SendRequest<ProxyBody>, Arc<ConnectError>>> + Send>>>;

/// What a request found for its backend.
enum Found {
    Open(SendRequest<ProxyBody>),
    Connecting(Connecting),
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
            connects: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (its URI absolute) to `to`.
    pub async fn send(
        &self,
        to: Destination<'_>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut resent = false;
        loop {
            let mut sender = match self.find(to) {
                Found::Open(sender) => sender,
                Found::Connecting(connecting) => match connecting.clone().await {
                    Ok(sender) => sender,
                    Err(failed) => {
                        self.forget_failed(to.key, &connecting);
                        return Err(SendError::Connect(failed));
                    }
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response.map(UpstreamBody::http2)),
                Err(mut failed) => match failed.take_message() {
                    // The connection closed (a GOAWAY as the backend rotates
                    // its connections, say) before it took the request:
                    // nothing reached the backend, so the request goes out
                    // again, once, on the connection that replaces it.
                    Some(untouched) if !resent => {
                        self.forget_closed(to.key);
                        request = untouched;
                        resent = true;
                    }
                    _ => return Err(SendError::Request(Box::new(failed.into_error()))),
                },
            }
        }
    }

    /// The open connection to `to`, or the connect under way to it (started
    /// here when there is none).
    fn find(&self, to: Destination<'_>) -> Found {
        let now = self.sweeps.load(Ordering::Relaxed);
        let mut open = self.open.lock().expect("never poisoned");
        match open.get_mut(to.key) {
            Some(Slot::Open { sender, used }) if !sender.is_closed() => {
                *used = now;
                return Found::Open(sender.clone());
            }
            Some(Slot::Connecting { connecting, .. }) => return Found::Connecting(connecting.clone()),
            _ => {}
        }
        let id = self.connects.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(connect(self.me.clone(), id, self.connector.clone(), to));
        let connecting = async move {
            task.await.unwrap_or_else(|_| Err(Arc::new(ConnectError::Io(std::io::Error::other("the connect was cut")))))
        };
        let connecting = (Box::pin(connecting) as Pin<Box<dyn Future<Output = _> + Send>>).shared();
        open.insert(Arc::clone(to.key), Slot::Connecting { connecting: connecting.clone(), id });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(self.me.clone()));
        }
        Found::Connecting(connecting)
    }

    /// Puts the outcome of connect `id` to `key` in place: its connection,
    /// or no slot after a failure, so that the next request tries again.
    fn settle(&self, key: &Arc<str>, id: u64, outcome: &Result<SendRequest<ProxyBody>, Arc<ConnectError>>) {
        let mut open = self.open.lock().expect("never poisoned");
        if !matches!(open.get(key), Some(Slot::Connecting { id: current, .. }) if *current == id) {
            return;
        }
        match outcome {
            Ok(sender) => {
                let used = self.sweeps.load(Ordering::Relaxed);
                open.insert(Arc::clone(key), Slot::Open { sender: sender.clone(), used });
            }
            Err(_) => drop(open.remove(key)),
        }
    }

    /// Lets go of `key`'s connection: the next request opens a new one.
    pub fn forget(&self, key: &str) {
        self.open.lock().expect("never poisoned").remove(key);
    }

    /// Clears `key`'s slot if it still holds the failed connect `failed`:
    /// the connect settles its own slot, but one whose task was cut (it
    /// panicked) never did, and would fail every request after it.
    fn forget_failed(&self, key: &str, failed: &Connecting) {
        let mut open = self.open.lock().expect("never poisoned");
        if matches!(open.get(key), Some(Slot::Connecting { connecting, .. }) if connecting.ptr_eq(failed)) {
            open.remove(key);
        }
    }

    /// Lets go of `key`'s connection if it has closed.
    fn forget_closed(&self, key: &str) {
        let mut open = self.open.lock().expect("never poisoned");
        if let Some(Slot::Open { sender, .. }) = open.get(key) {
            if sender.is_closed() {
                open.remove(key);
            }
        }
    }
}

/// Connect `id`: a new connection to `to` (TCP, TLS, the HTTP/2 preface,
/// within the connect timeout), put in place in the pool if it still lives.
fn connect(
    pool: Weak<H2Pool>,
    id: u64,
    connector: Connector,
    to: Destination<'_>,
) -> impl Future<Output = Result<SendRequest<ProxyBody>, Arc<ConnectError>>> + Send + 'static {
    let key = Arc::clone(to.key);
    let authority = to.authority.clone();
    let tls: Option<UpstreamTls> = to.tls.cloned();
    async move {
        let handshake = async {
            let stream = connector.connect(&authority, tls.as_ref()).await?;
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_PING)
                .adaptive_window(true)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(ConnectError::Http2Handshake)
        };
        let outcome = match handshake.await {
            Ok((sender, connection)) => {
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "backend HTTP/2 connection ended with an error");
                    }
                });
                Ok(sender)
            }
            Err(error) => Err(Arc::new(error)),
        };
        if let Some(pool) = pool.upgrade() {
            pool.settle(&key, id, &outcome);
        }
        outcome
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
        connections.open.lock().expect("never poisoned").retain(|_, slot| match slot {
            Slot::Open { sender, used } => !sender.is_closed() && now - *used < super::http1::MAX_IDLE_SWEEPS,
            // It settles itself, within the connect timeout.
            Slot::Connecting { .. } => true,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// A real h2c server answering 200; counts the connections it accepts.
    async fn h2c_backend() -> (Arc<str>, Arc<AtomicUsize>) {
        crate::client::test_server::counting(|tcp| async move {
            let service = hyper::service::service_fn(|_request| async {
                let body = http_body_util::Full::new(bytes::Bytes::from_static(b"ok"));
                Ok::<_, std::convert::Infallible>(Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        })
        .await
    }

    /// Requests that find no connection while one is being opened wait for
    /// it: a burst to a cold backend opens one connection, not one each.
    #[tokio::test]
    async fn a_burst_to_a_cold_backend_opens_one_connection() {
        let (address, accepted) = h2c_backend().await;
        let pool = H2Pool::new(Connector::new(Duration::from_secs(5)));
        let authority: http::uri::Authority = address.parse().unwrap();
        let to = Destination { key: &address, authority: &authority, tls: None };
        let requests = (0..20).map(|_| {
            let request = Request::get(format!("http://{address}/")).body(crate::body::empty()).unwrap();
            pool.send(to, request)
        });
        for response in futures_util::future::join_all(requests).await {
            assert_eq!(response.unwrap().status(), http::StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "twenty requests, one connection");
    }

    /// A connect whose task was cut never settles its slot: the request that
    /// finds it failed clears it, and the next one connects.
    #[tokio::test]
    async fn a_connect_that_never_settled_does_not_fail_the_requests_after_it() {
        let (address, accepted) = h2c_backend().await;
        let pool = H2Pool::new(Connector::new(Duration::from_secs(5)));
        let cut = async { Err(Arc::new(ConnectError::Io(std::io::Error::other("the connect was cut")))) };
        let connecting = (Box::pin(cut) as Pin<Box<dyn Future<Output = _> + Send>>).shared();
        pool.open.lock().unwrap().insert(Arc::clone(&address), Slot::Connecting { connecting, id: u64::MAX });
        let authority: http::uri::Authority = address.parse().unwrap();
        let to = Destination { key: &address, authority: &authority, tls: None };
        let request = || Request::get(format!("http://{address}/")).body(crate::body::empty()).unwrap();
        assert!(matches!(pool.send(to, request()).await, Err(SendError::Connect(_))));
        assert_eq!(pool.send(to, request()).await.unwrap().status(), http::StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
