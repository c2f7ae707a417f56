//! Hot reload. A reload is all or nothing. The file is read and fully
//! validated, sockets for new listeners are bound, and only then is the new
//! snapshot compiled (carrying every kept backend's state) and swapped in with
//! one atomic store. Any failure before the swap leaves everything as it was.
//! After the swap, new listeners start, removed ones stop accepting and drain
//! in the background, and unchanged ones keep their sockets (so no client ever
//! sees a refused connection). Reloads are serialized by one async mutex,
//! which is never touched by the request path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{bind, bind_for_workers, digest, Bound, Runtime};
use crate::admin;
use crate::config::{self, ConfigErrors};
use crate::server;
use crate::state::Snapshot;

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
    #[error("{0}")]
    LogFile(#[from] crate::logging::OpenError),
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

impl Runtime {
    /// Re-reads the config file and applies it (see the module docs).
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadSummary, ReloadError> {
        let mut bound = self.bound.lock().await;
        let result = self.reload_locked(&mut bound, trigger).await;
        // `reload_locked` said RELOADING=1 once the reload was more than an
        // unchanged file; READY=1 after a refused one too (the old config serves).
        if !matches!(&result, Ok(summary) if !summary.changed) {
            crate::systemd::reloaded(result.is_ok());
        }
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
        let config = config::parse(&text, &path.display().to_string());
        // The same text can name certificate files whose content changed (a
        // renewal): only the listeners can differ then, with their files.
        if same_text && config.as_ref().is_ok_and(|config| config.listeners == previous.config.listeners) {
            return Ok(ReloadSummary::unchanged(previous.generation));
        }
        crate::systemd::reloading();
        bound.last_digest = Some(text_digest);
        let config = config?;

        // Bind first: a port that is taken fails the reload before anything changes.
        let mut new_sockets = Vec::new();
        for listener in config.listeners.iter().filter(|l| !bound.listeners.contains_key(&l.bind)) {
            new_sockets.push((listener, bind_for_workers(&listener.name, listener.bind, self.workers.len())?));
        }
        let new_admin_socket =
            if config.admin.bind != bound.admin_bind { Some(bind("admin", config.admin.bind)?) } else { None };

        // The log section applies here: its files open (or the reload fails)
        // before anything else changes. A failure forgets the text, so that
        // the same file applies once the directory is fixed and it is touched.
        if let Err(error) = crate::logging::apply(&config.log) {
            bound.last_digest = None;
            return Err(error.into());
        }

        // Nothing fails from here on. A new discovery is looked up first, so
        // its upstream starts with backends.
        bound.discovery.sync(&config).await;
        let discovered = bound.discovery.discovered();
        let snapshot = Snapshot::compile_discovered(&config, &discovered, Some(&previous), previous.generation + 1);
        let mut summary = ReloadSummary::between(&previous, &snapshot);
        self.install(bound, previous, snapshot);

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

    pub(super) fn between(old: &Snapshot, new: &Snapshot) -> Self {
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
