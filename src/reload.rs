//! The running proxy's mutable shell: its listeners, its admin listener, and
//! hot reload.
//!
//! A reload is all or nothing. The file is read and fully validated, sockets for
//! new listeners are bound, and only then is the new snapshot compiled (carrying
//! every kept backend's state) and swapped in with one atomic store. Any failure
//! before the swap leaves everything as it was. After the swap, new listeners
//! start, removed ones stop accepting and drain in the background, and unchanged
//! ones keep their sockets (so no client ever sees a refused connection).
//! Reloads are serialized by one async mutex, which is never touched by the
//! request path.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::admin::{self, AdminHandle};
use crate::breaker::Phase;
use crate::client::UpstreamClients;
use crate::clock::nanos_since_epoch;
use crate::config::{self, Config, ConfigErrors};
use crate::health::active::Checkers;
use crate::server::workers::Workers;
use crate::server::{self, ListenerHandle, ServeContext};
use crate::state::{Live, Snapshot};
use crate::upstream::Backend;

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// SIGHUP.
    Signal,
    /// `POST /reload` on the admin listener.
    Admin,
    /// The file watcher saw the file (or its directory) change.
    FileChange,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot listen on {bind} (listener `{name}`): {source}")]
    Bind { name: String, bind: SocketAddr, source: std::io::Error },
    #[error("this proxy was started without a config file, so there is nothing to reload")]
    NoConfigFile,
    #[error("cannot start the request worker threads: {source}")]
    Workers { source: std::io::Error },
}

/// What a successful reload changed.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadSummary {
    pub generation: u64,
    /// False when the file watcher saw no change in content (nothing was swapped).
    pub changed: bool,
    pub listeners_added: Vec<SocketAddr>,
    pub listeners_removed: Vec<SocketAddr>,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub backends_kept: usize,
}

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

impl Runtime {
    /// Binds everything `config` asks for and starts serving. `config_path` is
    /// the file reloads read; `None` for a config given as text.
    pub async fn start(config: &Config, config_path: Option<PathBuf>) -> Result<Arc<Runtime>, ReloadError> {
        crate::metrics::install();
        let live: Live = Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::compile(config, None, 1)));
        let digest = config_path.as_deref().and_then(|p| config::read(p).ok()).map(|text| digest(&text));
        let connect_timeout = config.limits.connect_timeout;
        let workers = Workers::start(config.workers, || UpstreamClients::new(connect_timeout))
            .map_err(|source| ReloadError::Workers { source })?;
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            sockets.push((listener, bind_for_workers(&listener.name, listener.bind, workers.len())?));
        }
        let admin_socket = bind("admin", config.admin.bind)?;
        let serve = ServeContext {
            live: Arc::clone(&live),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
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
            bound.admin =
                Some(admin::spawn(admin_socket, Arc::downgrade(&runtime)).map_err(|source| ReloadError::Bind {
                    name: "admin".into(),
                    bind: config.admin.bind,
                    source,
                })?);
        }
        crate::metrics::config_generation(1);
        crate::metrics::register_config_series(&runtime.live.load());
        let weak = Arc::downgrade(&runtime);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING);
            loop {
                tick.tick().await;
                let Some(runtime) = weak.upgrade() else { return };
                let snapshot = runtime.live.load();
                crate::metrics::refresh_gauges(&snapshot);
                crate::metrics::upkeep();
                // Capacity can also appear without a slot being freed (a backend
                // recovers, a circuit half-opens, a reload adds backends): the
                // first waiter of each queue gets a look every tick.
                for queue in snapshot.upstreams.iter().filter_map(|u| u.queue.as_ref()) {
                    queue.slot_freed();
                }
                // A reload in progress sweeps for itself.
                if let Ok(mut bound) = runtime.bound.try_lock() {
                    bound.free_unused_snapshots();
                };
            }
        });
        Ok(runtime)
    }

    /// Re-reads the config file and applies it; see the module docs.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadSummary, ReloadError> {
        let mut bound = self.bound.lock().await;
        let result = self.reload_locked(&mut bound, trigger).await;
        match &result {
            Ok(summary) if !summary.changed => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(summary) => {
                self.stats.success.fetch_add(1, Ordering::Relaxed);
                *self.stats.last_error.lock().expect("never poisoned") = None;
                crate::metrics::config_reload(true);
                crate::metrics::config_generation(summary.generation);
                tracing::info!(?trigger, generation = summary.generation, added = ?summary.listeners_added,
                    removed = ?summary.listeners_removed, backends_added = summary.backends_added,
                    backends_removed = summary.backends_removed, "config reloaded");
            }
            Err(error) => {
                self.stats.error.fetch_add(1, Ordering::Relaxed);
                *self.stats.last_error.lock().expect("never poisoned") = Some(error.to_string());
                crate::metrics::config_reload(false);
                tracing::error!(?trigger, "config reload failed; the running config is unchanged:\n{error}");
            }
        }
        result
    }

    async fn reload_locked(&self, bound: &mut Bound, trigger: ReloadTrigger) -> Result<ReloadSummary, ReloadError> {
        let path = self.config_path.as_deref().ok_or(ReloadError::NoConfigFile)?;
        let text = config::read(path)?;
        let text_digest = digest(&text);
        let previous = self.live.load_full();
        let same_text = trigger == ReloadTrigger::FileChange && bound.last_digest == Some(text_digest);
        let has_tls = previous.config.listeners.iter().any(|l| l.tls.is_some());
        if same_text && !has_tls {
            return Ok(ReloadSummary::unchanged(previous.generation));
        }
        bound.last_digest = Some(text_digest);
        let config = config::parse(&text, &path.display().to_string())?;
        // The same text can name certificate files whose content changed (a
        // renewal): only the listeners can differ then, with their files.
        if same_text && config.listeners == previous.config.listeners {
            return Ok(ReloadSummary::unchanged(previous.generation));
        }

        // Bind first: a port that is taken fails the reload before anything changes.
        let mut new_sockets = Vec::new();
        for listener in config.listeners.iter().filter(|l| !bound.listeners.contains_key(&l.bind)) {
            new_sockets.push((listener, bind_for_workers(&listener.name, listener.bind, self.workers.len())?));
        }
        let new_admin_socket =
            if config.admin.bind != bound.admin_bind { Some(bind("admin", config.admin.bind)?) } else { None };

        let snapshot = Snapshot::compile(&config, Some(&previous), previous.generation + 1);
        let mut summary = ReloadSummary::between(&previous, &snapshot);
        let snapshot = Arc::new(snapshot);
        self.live.store(Arc::clone(&snapshot));
        previous.retire_removed(&snapshot);
        crate::metrics::register_config_series(&snapshot);
        bound.checkers.sync(&snapshot);
        bound.retired.push(previous);
        bound.free_unused_snapshots();

        for (listener, socket) in new_sockets {
            let handle = server::spawn(listener.name.as_str().into(), socket, &self.serve, &self.workers);
            summary.listeners_added.push(listener.bind);
            bound.listeners.insert(listener.bind, handle);
        }
        let wanted: HashSet<SocketAddr> = config.listeners.iter().map(|l| l.bind).collect();
        let removed: Vec<SocketAddr> = bound.listeners.keys().filter(|b| !wanted.contains(b)).copied().collect();
        for bind in removed {
            if let Some(handle) = bound.listeners.remove(&bind) {
                summary.listeners_removed.push(bind);
                // Draining may take up to shutdown_grace; the reload does not wait.
                tokio::spawn(handle.stop());
            }
        }
        if let Some(socket) = new_admin_socket {
            let handle = admin::spawn(socket, self.me.clone()).map_err(|source| ReloadError::Bind {
                name: "admin".into(),
                bind: config.admin.bind,
                source,
            })?;
            if let Some(old) = bound.admin.replace(handle) {
                old.stop();
            }
            bound.admin_bind = config.admin.bind;
        }
        self.resize_connection_cap(bound, config.limits.max_connections);
        for (_, clients) in self.workers.iter() {
            clients.set_connect_timeout(config.limits.connect_timeout);
        }
        Ok(summary)
    }

    fn resize_connection_cap(&self, bound: &mut Bound, wanted: usize) {
        let semaphore = &self.serve.connections;
        if wanted > bound.max_connections {
            semaphore.add_permits(wanted - bound.max_connections);
        } else {
            // Only idle permits can be withdrawn; open connections above the new
            // cap finish normally and their permits are not reissued beyond it.
            let withdrawn = semaphore.forget_permits(bound.max_connections - wanted);
            if withdrawn < bound.max_connections - wanted {
                tracing::warn!(
                    wanted,
                    "max_connections lowered below the open connection count; the cap tightens as they close"
                );
            }
        }
        bound.max_connections = wanted;
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
    }

    pub async fn status(&self) -> Status {
        let snapshot = self.live.load_full();
        let now = nanos_since_epoch();
        let listeners = self
            .listener_addrs()
            .await
            .into_iter()
            .map(|(name, addr)| {
                let tls = snapshot.config.listeners.iter().find(|l| *l.name == *name).and_then(|l| l.tls.as_ref());
                ListenerStatus {
                    name: name.to_string(),
                    address: addr,
                    certificates: tls.map(|tls| tls.certificates.iter().map(CertificateStatus::of).collect()),
                }
            })
            .collect();
        let upstreams = snapshot
            .upstreams
            .iter()
            .map(|u| UpstreamStatus {
                name: u.name.to_string(),
                policy: u.config.policy.name(),
                queue_waiting: u.queue.as_ref().map(|q| q.waiting()),
                backends: u.backends.iter().map(|b| BackendStatus::of(b, now)).collect(),
            })
            .collect();
        let health_checkers = self.bound.lock().await.checkers.len();
        Status {
            generation: snapshot.generation,
            draining: self.is_draining(),
            reloads: ReloadCounts {
                success: self.stats.success.load(Ordering::Relaxed),
                error: self.stats.error.load(Ordering::Relaxed),
                unchanged: self.stats.unchanged.load(Ordering::Relaxed),
                last_error: self.stats.last_error.lock().expect("never poisoned").clone(),
            },
            listeners,
            health_checkers,
            upstreams,
        }
    }
}

impl ReloadSummary {
    fn unchanged(generation: u64) -> Self {
        ReloadSummary {
            generation,
            changed: false,
            listeners_added: Vec::new(),
            listeners_removed: Vec::new(),
            backends_added: 0,
            backends_removed: 0,
            backends_kept: 0,
        }
    }

    fn between(old: &Snapshot, new: &Snapshot) -> Self {
        let keys = |s: &Snapshot| -> HashSet<(String, String)> {
            s.upstreams
                .iter()
                .flat_map(|u| u.backends.iter().map(move |b| (u.name.to_string(), b.address.to_string())))
                .collect()
        };
        let (before, after) = (keys(old), keys(new));
        ReloadSummary {
            generation: new.generation,
            changed: true,
            listeners_added: Vec::new(),
            listeners_removed: Vec::new(),
            backends_added: after.difference(&before).count(),
            backends_removed: before.difference(&after).count(),
            backends_kept: after.intersection(&before).count(),
        }
    }
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

/// `GET /status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub generation: u64,
    pub draining: bool,
    pub reloads: ReloadCounts,
    pub listeners: Vec<ListenerStatus>,
    /// Active checker tasks running: one per distinct (backend address, check).
    pub health_checkers: usize,
    pub upstreams: Vec<UpstreamStatus>,
}

#[derive(Debug, Serialize)]
pub struct ReloadCounts {
    pub success: u64,
    pub error: u64,
    /// File change events whose content was the same as the running config's
    /// (an editor's touch, a swap file): nothing was reloaded.
    pub unchanged: u64,
    /// The last failed reload's error, until a reload succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: SocketAddr,
    /// The listener's TLS certificates in the config's order (the first is
    /// the default); `null` for a plain listener.
    pub certificates: Option<Vec<CertificateStatus>>,
}

#[derive(Debug, Serialize)]
pub struct CertificateStatus {
    pub cert: String,
    pub names: Vec<String>,
    /// `2027-01-01T00:00:00Z`.
    pub not_after: String,
    /// Negative once it has expired.
    pub expires_in_seconds: i64,
}

impl CertificateStatus {
    fn of(certificate: &crate::config::tls::Certificate) -> Self {
        CertificateStatus {
            cert: certificate.cert_path.display().to_string(),
            names: certificate.names.clone(),
            not_after: crate::config::tls::date(certificate.not_after),
            expires_in_seconds: certificate.expires_in_seconds(std::time::SystemTime::now()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub policy: &'static str,
    /// Requests waiting for a free backend; `null` without a queue.
    pub queue_waiting: Option<usize>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// The weight it gets now: lower during slow start.
    pub effective_weight: f64,
    pub max_concurrency: Option<u32>,
    pub in_flight: u32,
    pub latency_ms: Option<f64>,
    /// Eligible by health: the active check passes (or there is none) and not ejected.
    pub healthy: bool,
    /// Whether a policy may pick it now, and why or why not, in words.
    pub eligible: bool,
    pub why: String,
    /// Seconds until a passive ejection ends; `null` when not ejected.
    pub ejected_for_seconds: Option<f64>,
    /// Passive detection's current streak of failed requests.
    pub consecutive_request_failures: u32,
    pub active_check: Option<ActiveCheckStatus>,
    /// `closed`, `open` or `half-open`; `null` without a circuit breaker.
    pub circuit: Option<Phase>,
    /// Seconds until an open circuit lets a probe through.
    pub circuit_open_for_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ActiveCheckStatus {
    pub healthy: bool,
    pub last_passed: Option<bool>,
    /// Why the last check passed or failed: `status 503`, `timeout after 1s`, ...
    pub last_reason: Option<String>,
    pub last_checked_seconds_ago: Option<f64>,
    pub consecutive_passes: u32,
    pub consecutive_failures: u32,
}

impl BackendStatus {
    fn of(backend: &Backend, now: u64) -> Self {
        let seconds = |ns: u64| ns as f64 / 1e9;
        let ejected_until = backend.state.passive.ejected_until();
        let (eligible, why) = crate::explain::backend_verdict(backend, now);
        BackendStatus {
            eligible,
            why,
            address: backend.address.to_string(),
            weight: backend.weight,
            effective_weight: backend.effective_weight(now),
            max_concurrency: (backend.max_concurrency != u32::MAX).then_some(backend.max_concurrency),
            in_flight: backend.in_flight(),
            latency_ms: backend.state.latency.estimate().map(|ns| ns / 1e6),
            healthy: backend.is_healthy(now),
            ejected_for_seconds: (ejected_until > now).then(|| seconds(ejected_until - now)),
            consecutive_request_failures: backend.state.passive.consecutive_failures(),
            circuit: backend.breaker.map(|_| backend.state.breaker.snapshot().phase()),
            circuit_open_for_seconds: backend
                .breaker
                .and_then(|_| backend.state.breaker.snapshot().open_remaining(now))
                .map(|d| d.as_secs_f64()),
            active_check: backend.check.as_ref().map(|check| {
                let last = check.last();
                let (consecutive_passes, consecutive_failures) = check.consecutive();
                ActiveCheckStatus {
                    healthy: check.is_healthy(),
                    last_passed: last.as_ref().map(|l| l.passed),
                    last_reason: last.as_ref().map(|l| l.reason.clone()),
                    last_checked_seconds_ago: last.as_ref().map(|l| seconds(now.saturating_sub(l.at_nanos))),
                    consecutive_passes,
                    consecutive_failures,
                }
            }),
        }
    }
}
