//! Integration tests: real servers and the real proxy on loopback.
//! One test binary (modules below) keeps link time down on small CI machines.

#![allow(clippy::disallowed_types)] // std::time::Instant: real processes on real time: the ban is for the proxy's own code

mod dns;
mod support;

mod access;
mod auth;
mod backend_http1;
mod cluster;
mod config_check;
mod config_schema;
mod connections;
mod demo;
mod deploy;
mod discovery;
mod forwarding;
mod fuzzing;
mod grpc;
mod health;
mod hostile;
mod lifecycle;
mod logs;
mod observability;
mod operations;
mod policies;
mod prometheus;
mod reload;
mod replicas;
mod request_path;
mod resilience;
mod robot;
mod streaming;
mod stuck;
mod systemd;
mod tls;
mod traces;
mod upgrade;
