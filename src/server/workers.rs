//! Request workers: one thread per core, each running its own current-thread
//! tokio runtime, so that a connection and every request on it stay on one
//! thread from accept to the last byte (Pingora's "no steal" runtimes).
//!
//! Each worker accepts on its own `SO_REUSEPORT` socket of every listener (the
//! kernel spreads connections over them) and sends to backends through its own
//! connection pools, so the request path has no cross-thread hand-off, no
//! shared pool lock and no work-stealing wake-ups. What must be one across
//! workers stays shared and lock-free: the live snapshot (one `ArcSwap`),
//! backend state (atomics), the connection cap (one semaphore), metrics.
//! The control plane (admin, reload, signals, housekeeping) runs on the main
//! runtime and health checks on their own thread.

use std::sync::Arc;

use tokio::runtime::Handle;

use crate::client::UpstreamClients;

/// The running worker threads; dropping this ends them (and every task on them).
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    clients: Arc<UpstreamClients>,
    /// Dropping it ends the thread's runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Workers {
    /// Starts `count` workers (at least one); `clients` makes each worker's
    /// own upstream clients.
    pub fn start(count: usize, clients: impl Fn() -> UpstreamClients) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || {
                crate::logging::buffer_this_thread();
                runtime.spawn(async {
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(crate::logging::FLUSH_EVERY) => {}
                            () = crate::logging::flush_now() => {}
                        }
                        crate::logging::flush_this_thread();
                    }
                });
                let _ = runtime.block_on(stopped);
                crate::logging::flush_this_thread();
            })?;
            workers.push(Worker { handle, clients: Arc::new(clients()), _stop: stop });
        }
        Ok(Workers { workers })
    }

    /// One per core, as `std::thread::available_parallelism` counts them.
    pub fn default_count() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Each worker's runtime and its upstream clients.
    pub fn iter(&self) -> impl Iterator<Item = (&Handle, &Arc<UpstreamClients>)> + Clone {
        self.workers.iter().map(|w| (&w.handle, &w.clients))
    }
}
