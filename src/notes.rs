//! What travels with a request through the proxy's layers: the request and
//! its notes ([`NotedRequest`]). The notes hold the client connection (from
//! the listener), the route (from routing) and what forwarding did (backend,
//! attempts, queue wait), for the layers that act on them and for the record
//! `observe` makes when the request is over.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;

use crate::backend::Backend;
use crate::conn::ConnInfo;
use crate::state::SnapshotShare;

/// A request on its way through the proxy's layers, with the notes they
/// share. The notes travel beside the request rather than in its extensions:
/// that would cost three allocations and hashed lookups per request.
pub struct NotedRequest {
    pub request: Request<Incoming>,
    pub notes: Arc<RequestNotes>,
}

/// What the layers a request passes through know of it: the client
/// connection (from the listener), the route (from routing), and what
/// forwarding did.
pub struct RequestNotes {
    /// The client connection; `None` only outside a listener (tests, benches).
    conn: Option<Arc<ConnInfo>>,
    /// The snapshot the request runs on and its route's index there.
    route: OnceLock<(SnapshotShare, usize)>,
    /// Index of the last backend tried in the route's upstream; `NONE` if none.
    backend: AtomicUsize,
    attempts: AtomicU32,
    queue_wait_micros: AtomicU64,
    /// The backend of the last try when the request moved to a reloaded
    /// upstream (rare: only then is this lock taken).
    rerouted_to: std::sync::Mutex<Option<Arc<Backend>>>,
    /// The client a trusted proxy named, when it is not the peer.
    forwarded_client: OnceLock<std::net::IpAddr>,
}

const NONE: usize = usize::MAX;
/// The last try went to a rerouted upstream's backend (see `rerouted_to`).
const REROUTED: usize = usize::MAX - 1;

impl RequestNotes {
    pub fn new(conn: Option<Arc<ConnInfo>>) -> Self {
        RequestNotes {
            conn,
            route: OnceLock::new(),
            backend: AtomicUsize::new(NONE),
            attempts: AtomicU32::new(0),
            queue_wait_micros: AtomicU64::new(0),
            rerouted_to: std::sync::Mutex::new(None),
            forwarded_client: OnceLock::new(),
        }
    }

    pub fn set_route(&self, snapshot: SnapshotShare, index: usize) {
        let _ = self.route.set((snapshot, index));
    }

    /// The snapshot the request runs on and the index of its route there.
    pub fn route(&self) -> Option<(&SnapshotShare, usize)> {
        self.route.get().map(|(snapshot, index)| (snapshot, *index))
    }

    pub fn conn(&self) -> Option<&Arc<ConnInfo>> {
        self.conn.as_ref()
    }

    /// A trusted proxy in front named the client (see `proxy::rewrite`).
    pub fn set_forwarded_client(&self, client: std::net::IpAddr) {
        let _ = self.forwarded_client.set(client);
    }

    /// The client as the access log names it: whom a trusted proxy named
    /// (its port unknown: 0), else the connection's peer (the PROXY
    /// protocol's client on a listener that has it).
    pub fn client(&self) -> Option<std::net::SocketAddr> {
        match self.forwarded_client.get() {
            Some(ip) => Some(std::net::SocketAddr::new(*ip, 0)),
            None => self.conn.as_ref().map(|conn| conn.client),
        }
    }

    /// A try went to backend `index` of the route's upstream (`backend`);
    /// after a reroute the index is of the replacement upstream, so the
    /// backend is kept instead.
    pub fn tried(&self, index: usize, rerouted: bool, backend: &Arc<Backend>) {
        if rerouted {
            *self.rerouted_to.lock().expect("never poisoned") = Some(Arc::clone(backend));
            self.backend.store(REROUTED, Ordering::Relaxed);
        } else {
            self.backend.store(index, Ordering::Relaxed);
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The request moved to a reloaded upstream; no backend of it tried yet.
    pub fn rerouted(&self) {
        self.backend.store(NONE, Ordering::Relaxed);
    }

    /// The backend of the last try, as an index into the route's upstream,
    /// or (`Err`) itself when the request moved to a reloaded upstream;
    /// `Ok(None)` when no backend was tried.
    pub fn last_backend(&self) -> Result<Option<usize>, Option<Arc<Backend>>> {
        match self.backend.load(Ordering::Relaxed) {
            NONE => Ok(None),
            REROUTED => Err(self.rerouted_to.lock().expect("never poisoned").clone()),
            index => Ok(Some(index)),
        }
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Time spent waiting in upstream queues.
    pub fn queue_wait(&self) -> Duration {
        Duration::from_micros(self.queue_wait_micros.load(Ordering::Relaxed))
    }

    pub fn queued(&self, waited: Duration) {
        self.queue_wait_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }
}
