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
    /// A second SIGTERM, SIGINT or SIGQUIT cut the drain short.
    pub const DRAIN_CUT_SHORT: i32 = 4;
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
        let watch = match config::watch::watch(path, &config.referenced_files()) {
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
    if let Err(error) = crate::logging::init(&config.log) {
        eprintln!("{error}");
        return exit::CANNOT_SERVE;
    }
    for warning in &config.warnings {
        tracing::warn!(%warning, "config");
    }
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
            // systemd first: the old process exits soon after `ready`, and
            // systemd must know the new main process before it sees that.
            crate::systemd::took_over();
            if let Err(error) = handover.ready() {
                // The old process is gone already; this one serves regardless.
                tracing::warn!(%error, "could not tell the previous process that this one serves");
            }
            tracing::info!("took over the listening sockets; the previous process drains");
            UpgradeListener::replace(&socket)
                .inspect_err(|error| tracing::warn!(%error, "cannot listen for the next upgrade"))
                .ok()
        }
        None => {
            crate::systemd::ready();
            waiting
        }
    };
    let successor = Successor { config: path, socket: &socket };
    let (handed_over, mut signals) = serve_signals(signals, &proxy.runtime, waiting.as_ref(), &successor).await;
    // After a hand-over the path is the successor's (or about to be).
    if let Some(listener) = waiting.filter(|_| !handed_over) {
        listener.remove();
    }
    if handed_over {
        // The service goes on in the successor: this process is no longer
        // the one systemd follows, and says nothing more to it.
        crate::systemd::handed_over();
    } else {
        crate::systemd::stopping();
    }
    tracing::info!(grace = ?proxy.live().load().limits.shutdown_grace, "stopping: draining in-flight requests");
    // From here on every line is written at once: the process may exit as
    // soon as the drain ends, with no periodic flush to come.
    crate::logging::write_at_once();
    drain(proxy, &mut signals, handed_over).await
}

/// Drains until done, or until a stop signal cuts it short, as nginx's fast
/// shutdown: the second one when this drain started with one, the first
/// otherwise. After a hand-over the drain started without one, so the stop
/// that `systemctl stop` sends every process of the unit lets it go on.
/// Log files are reopened meanwhile (logrotate does not wait for a drain).
async fn drain(proxy: RunningProxy, signals: &mut Signals, handed_over: bool) -> i32 {
    let shutdown = proxy.shutdown();
    tokio::pin!(shutdown);
    let mut stops_left = if handed_over { 2 } else { 1 };
    loop {
        tokio::select! {
            () = &mut shutdown => return exit::OK,
            () = signals.stop.next() => {
                stops_left -= 1;
                if stops_left == 0 {
                    tracing::warn!("stopping now: a second stop signal cut the drain short");
                    return exit::DRAIN_CUT_SHORT;
                }
                tracing::info!("already draining after a hand-over; a second stop signal cuts it short");
            }
            _ = signals.reopen.recv() => reopen_logs(),
        }
    }
}

/// SIGUSR1: the log files again, by their paths.
fn reopen_logs() {
    match crate::logging::reopen() {
        Ok(0) => tracing::info!("SIGUSR1: logs go to standard error, no log file to reopen"),
        Ok(files) => tracing::info!(files, "SIGUSR1: reopened the log files"),
        // A stream whose file could not be opened keeps the old one.
        Err(error) => tracing::error!(%error, "SIGUSR1"),
    }
}

/// How `run` starts the process that takes over from it on SIGUSR2: its own
/// executable, `run --upgrade` on the same config and upgrade socket.
struct Successor<'a> {
    config: &'a Path,
    socket: &'a Path,
}

impl Successor<'_> {
    fn start(&self) -> std::io::Result<tokio::process::Child> {
        let executable = std::env::current_exe()?;
        // A binary replaced on disk (the point of an upgrade) shows as
        // "... (deleted)": the path itself holds the new one.
        let executable = match executable.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(path) => std::path::PathBuf::from(path),
            None => executable,
        };
        let config = std::path::absolute(self.config)?;
        tokio::process::Command::new(executable)
            .args(["run", "--upgrade", "-c"])
            .arg(config)
            .arg("--upgrade-socket")
            .arg(self.socket)
            .spawn()
    }
}

/// The signals `run` answers, listened for from its first step (one that
/// arrives meanwhile is kept until the proxy serves), with the meanings
/// nginx gave them: TERM, INT and QUIT drain and stop; HUP reloads; USR2
/// starts the process that takes over; USR1 reopens log files.
struct Signals {
    stop: StopSignals,
    hangup: tokio::signal::unix::Signal,
    upgrade: tokio::signal::unix::Signal,
    reopen: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).unwrap_or_else(|error| panic!("cannot install a {name} handler: {error}"))
        };
        Signals {
            stop: StopSignals {
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                quit: listen(SignalKind::quit(), "SIGQUIT"),
            },
            hangup: listen(SignalKind::hangup(), "SIGHUP"),
            upgrade: listen(SignalKind::user_defined2(), "SIGUSR2"),
            reopen: listen(SignalKind::user_defined1(), "SIGUSR1"),
        }
    }
}

/// TERM, INT and QUIT: each drains and stops.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// The next SIGTERM, SIGINT or SIGQUIT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
            _ = self.quit.recv() => {}
        }
    }
}

/// Reloads on SIGHUP and starts a successor on SIGUSR2; returns on SIGTERM,
/// SIGINT or SIGQUIT (false), or once a new process has taken the listening
/// sockets over (true), with the signals for the drain that follows.
async fn serve_signals(
    mut signals: Signals,
    runtime: &Runtime,
    upgrades: Option<&UpgradeListener>,
    successor: &Successor<'_>,
) -> (bool, Signals) {
    let handed_over = async {
        match upgrades {
            Some(listener) => listener.hand_over(runtime).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(handed_over);
    let handed_over = loop {
        tokio::select! {
            () = signals.stop.next() => break false,
            () = &mut handed_over => break true,
            _ = signals.hangup.recv() => {
                let _ = runtime.reload(ReloadTrigger::Signal).await;
            }
            _ = signals.upgrade.recv() => start_successor(successor, upgrades.is_some()),
            _ = signals.reopen.recv() => reopen_logs(),
        }
    };
    (handed_over, signals)
}

/// SIGUSR2: starts this executable with `run --upgrade`; when it serves, it
/// takes the sockets over and this process drains (`serve_signals` sees the
/// hand-over). A successor that fails leaves this process serving.
fn start_successor(successor: &Successor<'_>, listening: bool) {
    if !listening {
        tracing::error!("SIGUSR2: not listening for upgrades (see the log at start), so no successor can take over");
        return;
    }
    match successor.start() {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), "SIGUSR2: started the process that takes over");
            // Waited for, so that one that fails is reported (and reaped).
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::error!(%status, "the process started by SIGUSR2 did not take over"),
                    Err(error) => tracing::error!(%error, "cannot wait for the process started by SIGUSR2"),
                }
            });
        }
        Err(error) => tracing::error!(%error, "SIGUSR2: cannot start the process that takes over"),
    }
}
