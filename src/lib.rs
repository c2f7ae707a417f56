//! Switchyard: an HTTP reverse-proxy load balancer for fleets of RPA bot servers
//! and RPC services. `docs/` has the user's view; this crate's modules follow a
//! request from listener to backend:
//!
//! - `server` accepts connections and assembles the one tower stack
//!   (`server::stack`): `observe` (metrics, access log) -> `error` (the one
//!   mapping to client responses) -> admission checks and `route` -> `proxy`
//!   (which holds the route's deadline). `conn` is what a client connection
//!   means to the rest: its `ConnInfo`, its slot under `max_connections`, the
//!   bound on a client that stops reading. `tls` is the listeners' rustls side
//!   (certificate by SNI) and the plain-or-TLS stream both directions use.
//! - `proxy` forwards: `balance` picks among `upstream` backends (policies in
//!   `balance/`), `queue` holds requests while every bot is busy, `retry` decides
//!   and budgets retries, `client` holds the pooled connections (plain or TLS).
//! - What the proxy learns about backends lives in `upstream::BackendState`:
//!   in-flight count, latency, `health` (active checks, passive ejection, slow
//!   start) and the `breaker`. It survives reloads. Its time comes from `clock`
//!   (a coarse monotonic clock: seconds matter there, not microseconds).
//! - `config` parses and validates the YAML (and reads the certificates it
//!   names, `config::tls`); `state` compiles it into the
//!   snapshot behind one `ArcSwap`; `reload` owns listeners, the admin listener
//!   (`admin`, with `explain`) and hot reload; `app` composes it all; `metrics`
//!   names every metric.

pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod clock;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod explain;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod queue;
pub mod reload;
pub mod retry;
pub mod route;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
