//! What travels with a request through the proxy's layers: the request and
//! its notes ([`NotedRequest`]), and, once routing has matched it, the same
//! with its route ([`RoutedRequest`], the only thing forwarding takes). The
//! notes hold the client connection and the snapshot the request runs on
//! (from the listener's layer), the route (from routing) and what forwarding
//! did (the backend of the last try, attempts, queue wait), for the layers
//! that act on them and for the record `observe` makes when the request is
//! over.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::Request;

use crate::backend::Backend;
use crate::body::ClientRequestBody;
use crate::conn::ConnInfo;
use crate::route::Route;
use crate::state::SnapshotShare;
use crate::trace::RequestTrace;
use crate::upstream::Upstream;

/// A request on its way through the proxy's layers, with the notes they
/// share. The notes travel beside the request rather than in its extensions:
/// that would cost three allocations and hashed lookups per request.
pub struct NotedRequest {
    pub request: Request<ClientRequestBody>,
    pub notes: Arc<RequestNotes>,
}

/// A request routing has matched: what forwarding takes, so that a stack
/// which forwards before it routes does not compile.
pub struct RoutedRequest {
    pub request: Request<ClientRequestBody>,
    pub notes: RoutedNotes,
}

/// The notes of a routed request, which name its route.
pub struct RoutedNotes {
    notes: Arc<RequestNotes>,
    /// The index of the route in the snapshot's router.
    route: usize,
}

impl NotedRequest {
    /// This request matched route `index` of its snapshot's router.
    pub fn routed(self, index: usize) -> RoutedRequest {
        self.notes.matched(index);
        RoutedRequest { request: self.request, notes: RoutedNotes { notes: self.notes, route: index } }
    }
}

impl RoutedNotes {
    /// The route the request matched, in the snapshot it runs on.
    pub fn route(&self) -> &Route {
        &self.notes.snapshot.router.routes()[self.route]
    }

    /// The notes themselves, for what outlives forwarding (a response body).
    pub fn shared(&self) -> &Arc<RequestNotes> {
        &self.notes
    }
}

impl std::ops::Deref for RoutedNotes {
    type Target = RequestNotes;

    fn deref(&self) -> &RequestNotes {
        &self.notes
    }
}

/// What the layers a request passes through know of it: the client
/// connection and the snapshot (from the listener's layer), the route (from
/// routing), and what forwarding did.
pub struct RequestNotes {
    conn: Arc<ConnInfo>,
    /// The live snapshot when the request arrived, loaded once: the request
    /// sees this config to its end.
    snapshot: SnapshotShare,
    /// The index of the request's route in `snapshot`'s router.
    route: OnceLock<usize>,
    /// The backend of the last try (only forwarding writes it, once per try:
    /// the lock is never contended).
    last_try: Mutex<Option<TriedBackend>>,
    attempts: AtomicU32,
    queue_wait_micros: AtomicU64,
    /// The client a trusted proxy named, when it is not the peer.
    forwarded_client: OnceLock<std::net::IpAddr>,
    /// Whom the route's `auth:` found the request to come from.
    principal: OnceLock<Arc<str>>,
    /// The request's trace, with `tracing:` on (set by `observe`). Boxed:
    /// a request without one carries a pointer's room, not the trace's.
    trace: OnceLock<Box<RequestTrace>>,
}

/// A backend a try went to: its index in the route's upstream or, when a
/// reload put another upstream in its place while the request waited, in
/// that one (held only then: the common case touches no count shared with
/// other workers).
#[derive(Clone)]
pub struct TriedBackend {
    pub index: usize,
    rerouted: Option<Arc<Upstream>>,
}

impl TriedBackend {
    /// The upstream the backend belongs to, for a request of `route`.
    pub fn upstream<'a>(&'a self, route: &'a Route) -> &'a Arc<Upstream> {
        self.rerouted.as_ref().unwrap_or(&route.upstream)
    }

    pub fn backend<'a>(&'a self, route: &'a Route) -> &'a Arc<Backend> {
        &self.upstream(route).backends[self.index]
    }

    /// Counts a request of `route` that ended with `status` (`None`: the
    /// client left first) in `switchyard_requests_total` for this backend.
    pub fn count_request(&self, route: &Route, status: Option<u16>) {
        match &self.rerouted {
            None => route.requests[self.index].count(status),
            // Rare: the backend is of a newer snapshot than the route's.
            Some(upstream) => upstream.backends[self.index].state.series.requests_of(&route.name).count(status),
        }
    }
}

impl RequestNotes {
    pub fn new(conn: Arc<ConnInfo>, snapshot: SnapshotShare) -> Self {
        RequestNotes {
            conn,
            snapshot,
            route: OnceLock::new(),
            last_try: Mutex::new(None),
            attempts: AtomicU32::new(0),
            queue_wait_micros: AtomicU64::new(0),
            forwarded_client: OnceLock::new(),
            principal: OnceLock::new(),
            trace: OnceLock::new(),
        }
    }

    /// The request matched route `index` (counted as that route's even when
    /// it goes no further).
    pub fn matched(&self, index: usize) {
        let _ = self.route.set(index);
    }

    /// The request's trace; `None` without `tracing:`.
    pub fn trace(&self) -> Option<&RequestTrace> {
        self.trace.get().map(|trace| &**trace)
    }

    pub fn set_trace(&self, trace: RequestTrace) {
        let _ = self.trace.set(Box::new(trace));
    }

    /// The snapshot the request runs on.
    pub fn snapshot(&self) -> &SnapshotShare {
        &self.snapshot
    }

    /// The route the request matched; `None` before routing or when none did.
    pub fn route(&self) -> Option<&Route> {
        self.route.get().map(|&index| &self.snapshot.router.routes()[index])
    }

    pub fn conn(&self) -> &Arc<ConnInfo> {
        &self.conn
    }

    /// A trusted proxy in front named the client (see `proxy::rewrite`).
    pub fn set_forwarded_client(&self, client: std::net::IpAddr) {
        let _ = self.forwarded_client.set(client);
    }

    pub fn set_principal(&self, principal: Arc<str>) {
        let _ = self.principal.set(principal);
    }

    /// Whom `auth:` found the request to come from; `None` on a route without it.
    pub fn principal(&self) -> Option<&str> {
        self.principal.get().map(|principal| &**principal)
    }

    /// The client as the access log names it: whom a trusted proxy named
    /// (its port unknown: 0), else the connection's peer (the PROXY
    /// protocol's client on a listener that has it).
    pub fn client(&self) -> std::net::SocketAddr {
        match self.forwarded_client.get() {
            Some(ip) => std::net::SocketAddr::new(*ip, 0),
            None => self.conn.client,
        }
    }

    /// A try went to backend `index` of the route's upstream, or of the
    /// upstream it was `rerouted` to.
    pub fn tried(&self, index: usize, rerouted: Option<&Arc<Upstream>>) {
        let tried = TriedBackend { index, rerouted: rerouted.cloned() };
        *self.last_try.lock().expect("never poisoned") = Some(tried);
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The request moved to a reloaded upstream; no backend of it tried yet.
    pub fn rerouted(&self) {
        *self.last_try.lock().expect("never poisoned") = None;
    }

    /// The backend of the last try, if one was tried.
    pub fn last_try(&self) -> Option<TriedBackend> {
        self.last_try.lock().expect("never poisoned").clone()
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
