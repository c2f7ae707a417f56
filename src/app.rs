//! Composition root: config in, running proxy out.
//!
//! Compiles the first snapshot, binds every listener (all or nothing: a bind
//! failure closes the ones already bound), and spawns them around one shared
//! stack. [`run`] is the `switchyard run` command: it adds logging and signals.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::client::UpstreamClients;
use crate::config::{self, Config};
use crate::server::{self, ListenerHandle, ServeContext};
use crate::state::{Live, Snapshot};

/// Process exit codes, as documented in the contract.
pub mod exit {
    pub const OK: i32 = 0;
    pub const BAD_CONFIG: i32 = 1;
    pub const BAD_USAGE: i32 = 2;
    pub const CANNOT_SERVE: i32 = 3;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {bind} (listener `{name}`): {source}")]
pub struct BindError {
    pub name: String,
    pub bind: SocketAddr,
    pub source: std::io::Error,
}

/// A proxy serving traffic.
pub struct RunningProxy {
    pub live: Live,
    listeners: Vec<ListenerHandle>,
}

impl RunningProxy {
    /// Starts serving `config`. Must be called inside a tokio runtime.
    pub async fn start(config: &Config) -> Result<RunningProxy, BindError> {
        let live: Live = Arc::new(ArcSwap::from_pointee(Snapshot::compile(config, None, 1)));
        let clients = Arc::new(UpstreamClients::new());
        let context = ServeContext {
            stack: server::stack::build(Arc::clone(&live), clients),
            limits: config.limits,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
        };
        let mut bound = Vec::new();
        for listener in &config.listeners {
            let socket = server::bind(listener.bind).map_err(|source| BindError {
                name: listener.name.clone(),
                bind: listener.bind,
                source,
            })?;
            bound.push((listener.name.as_str().into(), socket));
        }
        let listeners = bound
            .into_iter()
            .map(|(name, socket)| {
                server::spawn(name, socket, context.clone()).expect("a bound socket has an address")
            })
            .collect();
        Ok(RunningProxy { live, listeners })
    }

    /// The address each listener actually bound (useful with port 0).
    pub fn listener_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (Arc::clone(&l.name), l.local_addr))
            .collect()
    }

    /// Stops accepting and drains in-flight requests up to `shutdown_grace`.
    pub async fn shutdown(self) {
        futures_util::future::join_all(self.listeners.into_iter().map(ListenerHandle::stop)).await;
    }
}

/// `switchyard run`: serve until SIGTERM or SIGINT. Returns the exit code.
pub async fn run(path: &Path) -> i32 {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return exit::BAD_CONFIG;
        }
    };
    crate::logging::init(&config.log);
    let proxy = match RunningProxy::start(&config).await {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!(%error, "startup failed");
            eprintln!("{error}");
            return exit::CANNOT_SERVE;
        }
    };
    for (name, addr) in proxy.listener_addrs() {
        tracing::info!(listener = %name, %addr, "listening");
    }
    wait_for_stop_signal().await;
    tracing::info!(grace = ?config.limits.shutdown_grace, "stopping: draining in-flight requests");
    proxy.shutdown().await;
    exit::OK
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
