//! Switchyard: an HTTP reverse-proxy load balancer for fleets of RPA bot servers
//! and RPC services. `docs/` has the user's view; this crate's modules follow a
//! request from listener to backend:
//!
//! - `server` accepts connections and assembles the one tower stack
//!   (`server::stack`): the connection layer (one snapshot load, the
//!   request's notes) -> `observe` (metrics, access log) -> `error` (the one
//!   mapping to client responses) -> admission checks and `route` -> `proxy`
//!   (which holds the route's deadline); layers take a `notes::NotedRequest`,
//!   the request with what the layers note about it, and forwarding only a
//!   `notes::RoutedRequest`, one routing has matched. `conn` is what a client
//!   connection means to the rest: its `ConnInfo`, its slot under `max_connections`, the
//!   bound on a client that stops reading. `tls` is the listeners' rustls side
//!   (certificate by SNI) and the plain-or-TLS stream both directions use.
//! - `proxy` forwards: `balance` picks among `upstream` backends (policies in
//!   `balance/`), `queue` holds requests while every bot is busy, `retry` decides
//!   and budgets retries, `client` holds the pooled connections (plain or TLS).
//! - What the proxy learns about backends lives in `backend::BackendState`:
//!   in-flight count, latency, `health` (check verdicts, passive ejection, slow
//!   start) and the `breaker`. It survives reloads. Its time comes from `clock`
//!   (a coarse monotonic clock: seconds matter there, not microseconds). `probe`
//!   runs the active checks that feed `health`; `discovery` follows DNS for
//!   upstreams whose backends come from it.
//! - `config` parses and validates the YAML (and reads the certificates it
//!   names, `config::tls`); `state` compiles it into the snapshot behind one
//!   `ArcSwap`; `runtime` starts listeners, the admin listener (`admin`, with
//!   `explain`) and housekeeping, reloads (`runtime::reload`) and reports
//!   (`runtime::status`); `app` composes it all; `metrics` names every metric
//!   and `gauges` derives series from the snapshot.
//!
//! Dependencies between these modules point one way; docs/architecture.md
//! gives the layers and `tests/architecture.rs` checks them.
//!
//! The fuzz targets' instrumented build (cfg `fuzzing`, which cargo-fuzz and
//! scripts/fuzz-smoke set) leaves out the modules that run the process and that
//! no target's input reaches (`#[cfg(not(fuzzing))]` below): a third of that
//! build's time in this crate, and what the fuzzers run is the same code.

#[cfg(not(fuzzing))]
pub mod admin;
#[cfg(not(fuzzing))]
pub mod app;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
#[cfg(not(fuzzing))]
pub mod demo;
#[cfg(not(fuzzing))]
pub mod discovery;
pub mod error;
#[cfg(not(fuzzing))]
pub mod explain;
pub mod fuzzing;
#[cfg(not(fuzzing))]
pub mod gauges;
pub mod h1;
pub mod health;
#[cfg(not(fuzzing))]
pub mod logging;
pub mod metrics;
pub mod notes;
#[cfg(not(fuzzing))]
pub mod observe;
#[cfg(not(fuzzing))]
pub mod path;
#[cfg(not(fuzzing))]
pub mod probe;
pub mod proxy;
pub mod queue;
pub mod ratelimit;
pub mod retry;
pub mod route;
#[cfg(not(fuzzing))]
pub mod runtime;
#[cfg(not(fuzzing))]
pub mod server;
pub mod state;
#[cfg(not(fuzzing))]
pub mod stream_timeout;
#[cfg(not(fuzzing))]
pub mod systemd;
pub mod text;
pub mod tls;
/// Distributed tracing: W3C trace context and spans exported over OTLP.
pub mod trace;
#[cfg(not(fuzzing))]
pub mod upgrade;
pub mod upstream;
#[cfg(not(fuzzing))]
pub mod version;
