//! Listeners: accept connections, speak HTTP/1.1 or h2c (prior knowledge) on the
//! same port, hand each request to the proxy stack, and drain gracefully.
//!
//! One accept task per listener per worker (see `workers`), each on its own
//! `SO_REUSEPORT` socket. Each connection is read by our own HTTP/1.x loop
//! (`http1`), which hands one that opens with the HTTP/2 preface to hyper's
//! HTTP/2 server, so one port serves both protocols. At
//! `max_connections` each worker holds the one connection it accepted until a
//! place frees and stops accepting: the rest wait in the kernel backlog
//! instead of being accepted and dropped.
//!
//! `listen` binds the sockets and starts a task per worker; `accept` is that
//! task's loop (the accept, the wait for a place under `max_connections`,
//! idle connections); `connection` serves one connection (PROXY header, TLS,
//! the protocol, its close); `http1` is the HTTP/1.x loop; `drain` is how a
//! stopping listener lets its connections finish; `stack` is the request path
//! each connection serves.

mod accept;
mod admission;
mod connection;
mod drain;
mod http1;
mod listen;
mod proxy_protocol;
pub mod stack;
pub mod workers;

pub use listen::{bind, bind_for_workers, spawn, BoundListener, Inherited, ListenerHandle};

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::conn::ConnectionCount;
use crate::state::Live;

/// Everything a listener task needs besides its socket.
#[derive(Clone)]
pub struct ServeContext {
    /// Read per request for routes and upstreams, and at each accept for the
    /// current limits, so a reload's new limits apply to new connections
    /// without restarting listeners.
    pub live: Live,
    /// Shared by all listeners and workers: `max_connections` is a
    /// process-wide cap.
    pub connections: Arc<Semaphore>,
    pub connection_count: Arc<ConnectionCount>,
}
