//! Switchyard: an HTTP reverse-proxy load balancer for fleets of RPA bot servers
//! and RPC services. See `docs/` for the user's view; this crate's modules follow
//! the request from listener to backend:
//!
//! `server` (listeners, the tower stack) -> `route` -> `balance` (policies over
//! `upstream` backends) -> `proxy` (forwarding through `client` pools), with
//! `config` and `state` providing the compiled, swappable configuration and
//! `error` the one mapping from failures to client responses.

pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod config;
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
pub mod upstream;
