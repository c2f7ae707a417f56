//! The running proxy: its request workers, listeners and admin listener, the
//! one live snapshot, the discovery lookups (a changed set is compiled in as a
//! reload would), housekeeping (gauges, metrics upkeep, retired snapshots, the
//! heap trimmed after a burst of connections: [`trim`]) and shutdown. Hot
//! reload is in [`reload`], the `/status` view in [`status`]; the admin API
//! reaches the runtime through [`admin::Control`].

mod reload;
mod status;
mod trim;

pub use reload::{ReloadError, ReloadSummary, ReloadTrigger};
pub use status::Status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};

use crate::admin::{self, AdminHandle};
use crate::client::UpstreamClients;
use crate::config::{self, Config};
use crate::discovery::Discovery;
use crate::probe::Checkers;
use crate::server::workers::Workers;
use crate::server::{self, Inherited, ListenerHandle, ServeContext};
use crate::state::{Live, Snapshot};

/// Sockets and bookkeeping that only reloads change.
struct Bound {
    listeners: HashMap<SocketAddr, ListenerHandle>,
    admin: Option<AdminHandle>,
    admin_bind: SocketAddr,
    max_connections: usize,
    /// Hash of the file content last read, so that a watcher event for an
    /// unchanged file (an editor's swap file, a touch) does not reload.
    last_digest: Option<u64>,
    /// Snapshots replaced by reloads, kept until no request holds them, so that
    /// freeing a large snapshot happens here and never on a request's path.
    retired: Vec<Arc<Snapshot>>,
    checkers: Checkers,
    /// The DNS lookups of upstreams with `discovery`, and what they found.
    discovery: Discovery,
}

impl Bound {
    fn free_unused_snapshots(&mut self) {
        self.retired.retain(|snapshot| Arc::strong_count(snapshot) > 1);
    }
}

/// How often housekeeping runs: releasing retired snapshots and refreshing the
/// backend health gauges (ejections end by the clock, not by an event).
const HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
struct ReloadStats {
    success: AtomicU64,
    error: AtomicU64,
    unchanged: AtomicU64,
    last_error: Mutex<Option<String>>,
}

pub struct Runtime {
    pub live: Live,
    /// Handed to admin listeners, which must not keep the runtime alive.
    me: std::sync::Weak<Runtime>,
    config_path: Option<PathBuf>,
    serve: ServeContext,
    /// The request workers; every listener is served on each of them.
    workers: Workers,
    bound: tokio::sync::Mutex<Bound>,
    stats: ReloadStats,
    draining: AtomicBool,
}

/// Each listener of `config`: on the sockets a previous process handed over
/// where it binds the same address, else bound anew, one socket per worker.
fn bind_listeners<'a>(
    config: &'a Config,
    inherited: &mut Inherited,
    workers: usize,
) -> Result<Vec<(&'a crate::config::ListenerConfig, server::BoundListener)>, ReloadError> {
    config
        .listeners
        .iter()
        .map(|listener| {
            let bound = match inherited.listeners.remove(&listener.bind) {
                Some(handed) => server::BoundListener::inherited(listener.bind, handed, workers)
                    .map_err(|source| ReloadError::Bind { name: listener.name.clone(), bind: listener.bind, source })?,
                None => bind_for_workers(&listener.name, listener.bind, workers)?,
            };
            Ok((listener, bound))
        })
        .collect()
}

/// The admin listener's socket: the one handed over if it binds the same
/// address, else bound anew.
fn bind_admin(config: &Config, inherited: &mut Inherited) -> Result<tokio::net::TcpListener, ReloadError> {
    match inherited.admin.take().filter(|(bind, _)| *bind == config.admin.bind) {
        Some((_, socket)) => socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(socket))
            .map_err(|source| ReloadError::Bind { name: "admin".into(), bind: config.admin.bind, source }),
        None => bind("admin", config.admin.bind),
    }
}

/// Compiles and installs the next snapshot each time discovery finds a
/// changed set, for as long as the runtime lives.
async fn follow_discovery(runtime: Weak<Runtime>, changed: Arc<Notify>) {
    loop {
        changed.notified().await;
        let Some(runtime) = runtime.upgrade() else { return };
        runtime.apply_discovered().await;
    }
}

/// Once per `HOUSEKEEPING` for as long as the runtime lives: gauges, the
/// metrics' upkeep, a look for each queue's first waiter, and old snapshots
/// let go.
async fn housekeeping(runtime: Weak<Runtime>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    let mut burst = trim::BurstTrim::default();
    loop {
        tick.tick().await;
        let Some(runtime) = runtime.upgrade() else { return };
        let snapshot = runtime.live.load();
        crate::gauges::refresh_gauges(&snapshot);
        crate::metrics::upkeep();
        // Capacity can also appear without a slot being freed (a backend
        // recovers, a circuit half-opens, a reload adds backends): the
        // first waiter of each queue gets a look every tick.
        for queue in snapshot.upstreams.iter().filter_map(|u| u.queue.as_ref()) {
            queue.slot_freed();
        }
        for limit in snapshot.router.routes().iter().filter_map(|route| route.rate_limit.as_ref()) {
            limit.forget_idle();
        }
        let (peak, open) = runtime.serve.connection_count.take_peak();
        if burst.burst_ended(peak, open) {
            trim::release_free_heap();
        }
        // A reload in progress sweeps for itself.
        if let Ok(mut bound) = runtime.bound.try_lock() {
            bound.free_unused_snapshots();
        };
    }
}

impl Runtime {
    /// Binds everything `config` asks for and starts serving. `config_path` is
    /// the file reloads read; `None` for a config given as text.
    pub async fn start(config: &Config, config_path: Option<PathBuf>) -> Result<Arc<Runtime>, ReloadError> {
        Runtime::start_inheriting(config, config_path, Inherited::default()).await
    }

    /// [`Self::start`], serving on the sockets a previous process handed over
    /// (a binary upgrade) where the config binds the same address; the rest
    /// are bound as usual.
    pub async fn start_inheriting(
        config: &Config,
        config_path: Option<PathBuf>,
        mut inherited: Inherited,
    ) -> Result<Arc<Runtime>, ReloadError> {
        crate::metrics::install();
        let discovered_changed = Arc::new(Notify::new());
        let mut discovery = Discovery::new(&config.resolver, Arc::clone(&discovered_changed));
        discovery.sync(config).await;
        let first = Snapshot::compile_discovered(config, &discovery.discovered(), None, 1);
        let live: Live = Arc::new(arc_swap::ArcSwap::from_pointee(first));
        let digest = config_path.as_deref().and_then(|p| config::read(p).ok()).map(|text| digest(&text));
        let connect_timeout = config.limits.connect_timeout;
        let workers = Workers::start(config.workers, || UpstreamClients::new(connect_timeout))
            .map_err(|source| ReloadError::Workers { source })?;
        let sockets = bind_listeners(config, &mut inherited, workers.len())?;
        let admin_socket = bind_admin(config, &mut inherited)?;
        // Sockets of listeners this config no longer has close here; the
        // previous process still serves what it accepted on them.
        drop(inherited);
        let serve = ServeContext {
            live: Arc::clone(&live),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            connection_count: Arc::default(),
        };
        let runtime = Arc::new_cyclic(|me| Runtime {
            me: me.clone(),
            live,
            config_path,
            serve,
            workers,
            bound: tokio::sync::Mutex::new(Bound {
                listeners: HashMap::new(),
                admin: None,
                admin_bind: config.admin.bind,
                max_connections: config.limits.max_connections,
                last_digest: digest,
                retired: Vec::new(),
                checkers: Checkers::default(),
                discovery,
            }),
            stats: ReloadStats::default(),
            draining: AtomicBool::new(false),
        });
        {
            let mut bound = runtime.bound.lock().await;
            let snapshot = runtime.live.load_full();
            bound.checkers.sync(&snapshot);
            for (listener, socket) in sockets {
                let handle = server::spawn(listener.name.as_str().into(), socket, &runtime.serve, &runtime.workers);
                bound.listeners.insert(listener.bind, handle);
            }
            bound.admin = Some(
                admin::spawn(admin_socket, Arc::downgrade(&runtime) as Weak<dyn admin::Control>)
                    .map_err(|source| ReloadError::Bind { name: "admin".into(), bind: config.admin.bind, source })?,
            );
        }
        crate::metrics::config_generation(1);
        crate::gauges::register_config_series(&runtime.live.load());
        tokio::spawn(follow_discovery(Arc::downgrade(&runtime), discovered_changed));
        tokio::spawn(housekeeping(Arc::downgrade(&runtime)));
        Ok(runtime)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The address each listener actually bound, by configured bind.
    pub async fn listener_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let bound = self.bound.lock().await;
        let mut addrs: Vec<_> = bound.listeners.values().map(|l| (Arc::clone(&l.name), l.local_addr)).collect();
        addrs.sort_by_key(|(_, addr)| *addr);
        addrs
    }

    /// Duplicates of every listening socket, for a new process taking over
    /// (a binary upgrade): each proxy listener's sockets by configured bind,
    /// and the admin listener's.
    pub async fn handover_sockets(&self) -> std::io::Result<HandedSockets> {
        let bound = self.bound.lock().await;
        let mut listeners = Vec::new();
        for (bind, handle) in &bound.listeners {
            let sockets = handle.sockets.iter().map(|s| s.try_clone()).collect::<std::io::Result<Vec<_>>>()?;
            listeners.push((*bind, sockets));
        }
        let admin = match bound.admin.as_ref().and_then(|a| a.socket.as_ref()) {
            Some(socket) => Some((bound.admin_bind, socket.try_clone()?)),
            None => None,
        };
        Ok(HandedSockets { listeners, admin })
    }

    pub async fn admin_addr(&self) -> Option<SocketAddr> {
        self.bound.lock().await.admin.as_ref().map(|a| a.local_addr)
    }

    /// Stops accepting everywhere and drains in-flight requests up to
    /// `shutdown_grace`. The admin listener stays up (answering `/readyz` with
    /// 503) until the drain is over.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        let mut bound = self.bound.lock().await;
        let listeners: Vec<ListenerHandle> = bound.listeners.drain().map(|(_, l)| l).collect();
        futures_util::future::join_all(listeners.into_iter().map(ListenerHandle::stop)).await;
        if let Some(admin) = bound.admin.take() {
            admin.stop();
        }
        bound.checkers = Checkers::default();
        bound.discovery.stop();
        // The drained requests' spans, rather than lose the last second of them.
        let snapshot = self.live.load_full();
        if snapshot.tracing.is_some() {
            let flushed = tokio::task::spawn_blocking(move || snapshot.tracing.as_ref().map(|t| t.flush()));
            let _ = flushed.await;
        }
    }

    /// Serves the sets discovery found last: the running config compiled
    /// again with them, as a reload would, when any upstream's set changed.
    async fn apply_discovered(&self) {
        let mut bound = self.bound.lock().await;
        let previous = self.live.load_full();
        let discovered = bound.discovery.discovered();
        // The generation counts configs; a new DNS answer is not one.
        let snapshot =
            Snapshot::compile_discovered(&previous.config, &discovered, Some(&previous), previous.generation);
        let unchanged = snapshot.upstreams.iter().zip(&previous.upstreams).all(|(new, old)| Arc::ptr_eq(new, old));
        if unchanged {
            return;
        }
        let summary = ReloadSummary::between(&previous, &snapshot);
        tracing::info!(
            added = summary.backends_added,
            removed = summary.backends_removed,
            kept = summary.backends_kept,
            "serving a changed discovered set"
        );
        self.install(&mut bound, previous, snapshot);
    }

    /// Makes `snapshot` live in place of `previous`: retires what it dropped,
    /// registers its series and starts the checks it needs.
    fn install(&self, bound: &mut Bound, previous: Arc<Snapshot>, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        self.live.store(Arc::clone(&snapshot));
        previous.retire_removed(&snapshot);
        crate::gauges::register_config_series(&snapshot);
        bound.checkers.sync(&snapshot);
        bound.retired.push(previous);
        bound.free_unused_snapshots();
    }
}

/// Listening sockets on their way to a new process: proxy listeners by
/// configured bind, then the admin listener's.
pub struct HandedSockets {
    pub listeners: Vec<(SocketAddr, Vec<std::os::fd::OwnedFd>)>,
    pub admin: Option<(SocketAddr, std::os::fd::OwnedFd)>,
}

fn bind_for_workers(name: &str, addr: SocketAddr, workers: usize) -> Result<server::BoundListener, ReloadError> {
    server::bind_for_workers(addr, workers).map_err(|source| ReloadError::Bind {
        name: name.to_owned(),
        bind: addr,
        source,
    })
}

fn bind(name: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, ReloadError> {
    server::bind(addr).map_err(|source| ReloadError::Bind { name: name.to_owned(), bind: addr, source })
}

fn digest(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

impl admin::Control for Runtime {
    fn live(&self) -> &Live {
        &self.live
    }

    fn is_draining(&self) -> bool {
        Runtime::is_draining(self)
    }

    fn status(&self) -> BoxFuture<'_, Vec<u8>> {
        Box::pin(async move { admin::render_json(&Runtime::status(self).await) })
    }

    fn reload(&self) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            match Runtime::reload(self, ReloadTrigger::Admin).await {
                Ok(summary) => Ok(admin::render_json(&summary)),
                Err(error) => Err(error.to_string()),
            }
        })
    }
}
