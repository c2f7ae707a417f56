//! Composition root: config in, running proxy out.
//!
//! [`RunningProxy`] starts a [`Runtime`] (listeners, admin, reload) for library
//! users and tests; [`run`] is the `switchyard run` command, which adds logging,
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit), the file watcher
//! and binary upgrades (`upgrade`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::config::{self, Config};
use crate::runtime::{ReloadError, ReloadTrigger, Runtime};
use crate::server::Inherited;
use crate::state::Live;
use crate::upgrade::{self, UpgradeError, UpgradeListener};

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
        RunningProxy::start_from_file_inheriting(path, Inherited::default()).await
    }

    /// [`Self::start_from_file`] on the sockets a previous process handed
    /// over, where the config binds the same addresses (a binary upgrade).
    pub async fn start_from_file_inheriting(path: &Path, inherited: Inherited) -> Result<RunningProxy, ReloadError> {
        let config = config::load(path)?;
        let runtime = Runtime::start_inheriting(&config, Some(path.to_path_buf()), inherited).await?;
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

/// How `switchyard run` starts: on its own, or taking over from a running
/// process (`--upgrade`).
pub struct RunOptions {
    pub upgrade: bool,
    /// Where processes of this config meet for an upgrade; by default
    /// [`upgrade::socket_path`] of the config file.
    pub upgrade_socket: Option<std::path::PathBuf>,
}

/// `switchyard run`: serve until SIGTERM or SIGINT, or until a new process
/// has taken over. Returns the exit code.
pub async fn run(path: &Path, options: RunOptions) -> i32 {
    // Before anything is bound: a signal that comes while the proxy starts
    // waits for it (a reload, a shutdown) instead of killing it by default.
    let signals = Signals::install();
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return exit::BAD_CONFIG;
        }
    };
    crate::logging::init(&config.log);
    let socket = options.upgrade_socket.unwrap_or_else(|| upgrade::socket_path(path));
    // Taking over first: a failure here leaves the running process as it was.
    let (inherited, handover, waiting) = if options.upgrade {
        match upgrade::take_over(&socket) {
            Ok((inherited, handover)) => (inherited, Some(handover), None),
            Err(error) => {
                eprintln!("{error}");
                return exit::CANNOT_SERVE;
            }
        }
    } else {
        match UpgradeListener::bind(&socket) {
            Ok(listener) => (Inherited::default(), None, Some(listener)),
            Err(error @ UpgradeError::AlreadyServing(_)) => {
                eprintln!("{error}");
                return exit::CANNOT_SERVE;
            }
            // Someone else's socket, or a directory others may write to:
            // serve all the same (a squatter must not keep the proxy down),
            // without the upgrade path, and say so.
            Err(error @ (UpgradeError::Squatted { .. } | UpgradeError::NotPrivate { .. })) => {
                tracing::error!(%error, "not listening for upgrades: `run --upgrade` will not find this process");
                eprintln!("{error}");
                (Inherited::default(), None, None)
            }
            Err(error) => {
                tracing::warn!(%error, socket = %socket.display(), "cannot listen for upgrades; `run --upgrade` will not find this process");
                (Inherited::default(), None, None)
            }
        }
    };
    let proxy = match RunningProxy::start_from_file_inheriting(path, inherited).await {
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
    let waiting = match handover {
        Some(handover) => {
            if let Err(error) = handover.ready() {
                // The old process is gone already; this one serves regardless.
                tracing::warn!(%error, "could not tell the previous process that this one serves");
            }
            tracing::info!("took over the listening sockets; the previous process drains");
            UpgradeListener::replace(&socket)
                .inspect_err(|error| tracing::warn!(%error, "cannot listen for the next upgrade"))
                .ok()
        }
        None => waiting,
    };
    let handed_over = serve_signals(signals, &proxy.runtime, waiting.as_ref()).await;
    // After a hand-over the path is the successor's (or about to be).
    if let Some(listener) = waiting.filter(|_| !handed_over) {
        listener.remove();
    }
    tracing::info!(grace = ?proxy.live().load().limits.shutdown_grace, "stopping: draining in-flight requests");
    proxy.shutdown().await;
    exit::OK
}

/// The signals `run` answers, listened for from its first step: one that
/// arrives meanwhile is kept until the proxy serves.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            terminate: signal(SignalKind::terminate()).expect("can install a SIGTERM handler"),
            interrupt: signal(SignalKind::interrupt()).expect("can install a SIGINT handler"),
            hangup: signal(SignalKind::hangup()).expect("can install a SIGHUP handler"),
        }
    }
}

/// Reloads on SIGHUP; returns on SIGTERM or SIGINT (false), or once a new
/// process has taken the listening sockets over (true).
async fn serve_signals(signals: Signals, runtime: &Runtime, upgrades: Option<&UpgradeListener>) -> bool {
    let Signals { mut terminate, mut interrupt, mut hangup } = signals;
    let handed_over = async {
        match upgrades {
            Some(listener) => listener.hand_over(runtime).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(handed_over);
    loop {
        tokio::select! {
            _ = terminate.recv() => return false,
            _ = interrupt.recv() => return false,
            () = &mut handed_over => return true,
            _ = hangup.recv() => {
                let _ = runtime.reload(ReloadTrigger::Signal).await;
            }
        }
    }
}
