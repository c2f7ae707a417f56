//! Composition root: config in, running proxy out.
//!
//! [`RunningProxy`] starts a [`Runtime`] (listeners, admin, reload) for library
//! users and tests; [`run`] is the `switchyard run` command, which adds logging,
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit) and the file watcher.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::config::{self, Config};
use crate::runtime::{ReloadError, ReloadTrigger, Runtime};
use crate::state::Live;

/// Process exit codes, as documented in the contract.
pub mod exit {
    pub const OK: i32 = 0;
    pub const BAD_CONFIG: i32 = 1;
    pub const BAD_USAGE: i32 = 2;
    pub const CANNOT_SERVE: i32 = 3;
}

/// A proxy serving traffic.
pub struct RunningProxy {
    pub runtime: Arc<Runtime>,
    /// Keeps the config file watch alive, when there is one.
    _watch: Option<config::watch::ConfigWatch>,
}

impl RunningProxy {
    /// Serves `config`, which came from no file (so it cannot be reloaded).
    pub async fn start(config: &Config) -> Result<RunningProxy, ReloadError> {
        Ok(RunningProxy { runtime: Runtime::start(config, None).await?, _watch: None })
    }

    /// Serves the config file at `path` and reloads it when it changes on disk.
    pub async fn start_from_file(path: &Path) -> Result<RunningProxy, ReloadError> {
        let config = config::load(path)?;
        let runtime = Runtime::start(&config, Some(path.to_path_buf())).await?;
        let certificate_files: Vec<std::path::PathBuf> = config
            .listeners
            .iter()
            .filter_map(|listener| listener.tls.as_ref())
            .flat_map(|tls| &tls.certificates)
            .flat_map(|certificate| [certificate.cert_path.clone(), certificate.key_path.clone()])
            .collect();
        let watch = match config::watch::watch(path, &certificate_files) {
            Ok((watch, mut changes)) => {
                let weak = Arc::downgrade(&runtime);
                tokio::spawn(async move {
                    while changes.recv().await.is_some() {
                        let Some(runtime) = weak.upgrade() else { return };
                        // Errors are logged and counted by reload itself.
                        let _ = runtime.reload(ReloadTrigger::FileChange).await;
                    }
                });
                Some(watch)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP or POST /reload");
                None
            }
        };
        Ok(RunningProxy { runtime, _watch: watch })
    }

    pub fn live(&self) -> &Live {
        &self.runtime.live
    }

    /// The address each listener actually bound (useful with port 0).
    pub async fn listener_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.runtime.listener_addrs().await
    }

    pub async fn admin_addr(&self) -> SocketAddr {
        self.runtime.admin_addr().await.expect("admin listener runs until shutdown")
    }

    /// Stops accepting and drains in-flight requests up to `shutdown_grace`.
    pub async fn shutdown(self) {
        self.runtime.shutdown().await;
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
    let proxy = match RunningProxy::start_from_file(path).await {
        Ok(proxy) => proxy,
        Err(ReloadError::Config(errors)) => {
            // The file changed between the check above and the start.
            eprintln!("{errors}");
            return exit::BAD_CONFIG;
        }
        Err(error) => {
            tracing::error!(%error, "startup failed");
            eprintln!("{error}");
            return exit::CANNOT_SERVE;
        }
    };
    for (name, addr) in proxy.listener_addrs().await {
        tracing::info!(listener = %name, %addr, "listening");
    }
    tracing::info!(addr = %proxy.admin_addr().await, "admin listening");
    serve_signals(&proxy.runtime).await;
    tracing::info!(grace = ?proxy.live().load().limits.shutdown_grace, "stopping: draining in-flight requests");
    proxy.shutdown().await;
    exit::OK
}

/// Reloads on SIGHUP; returns on SIGTERM or SIGINT.
async fn serve_signals(runtime: &Runtime) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("can install a SIGHUP handler");
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hangup.recv() => {
                let _ = runtime.reload(ReloadTrigger::Signal).await;
            }
        }
    }
}
