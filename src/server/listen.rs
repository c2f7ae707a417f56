//! Listening sockets: bound once per worker with `SO_REUSEPORT` (or
//! inherited from the process before a binary upgrade), and a running
//! listener's handle, which stops it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::workers::Workers;
use super::{accept, stack, ServeContext};

/// Binds `addr` once, with the options a listener needs (the admin listener).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_socket(addr, false)?)
}

fn bind_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // Lets a restarted proxy bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A proxy listener's sockets, bound but not yet served: one per worker, all
/// on the same address with `SO_REUSEPORT`, so the kernel spreads connections
/// over the workers and no accepted connection changes threads.
#[derive(Debug)]
pub struct BoundListener {
    /// The bind as configured (port 0 stays 0): the listener's key in the
    /// config and the snapshot.
    pub configured: SocketAddr,
    pub local_addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `count` sockets to `addr` (port 0: the first picks the port, the
/// others take the same one).
pub fn bind_for_workers(addr: SocketAddr, count: usize) -> std::io::Result<BoundListener> {
    let first = bind_socket(addr, true)?;
    let local_addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(bind_socket(local_addr, true)?);
    }
    Ok(BoundListener { configured: addr, local_addr, sockets })
}

impl BoundListener {
    /// A listener from sockets another process was serving (a binary
    /// upgrade): the same sockets, so connections waiting in their queues are
    /// accepted here. With more workers than sockets, the extra workers get
    /// sockets of their own in the same `SO_REUSEPORT` group; with fewer, some
    /// workers accept on more than one.
    pub fn inherited(
        configured: SocketAddr,
        sockets: Vec<std::net::TcpListener>,
        workers: usize,
    ) -> std::io::Result<BoundListener> {
        let local_addr = sockets.first().ok_or(std::io::ErrorKind::InvalidInput)?.local_addr()?;
        let mut sockets = sockets;
        for socket in &sockets {
            socket.set_nonblocking(true)?;
        }
        while sockets.len() < workers {
            sockets.push(bind_socket(local_addr, true)?);
        }
        Ok(BoundListener { configured, local_addr, sockets })
    }
}

/// Listening sockets handed from one process to the next in a binary
/// upgrade, by configured bind.
#[derive(Debug, Default)]
pub struct Inherited {
    pub listeners: std::collections::HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    /// The admin listener's socket and its configured bind.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
}

/// A running listener; dropping the handle does not stop it, [`Self::stop`] does.
pub struct ListenerHandle {
    pub name: Arc<str>,
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Duplicates of the listening sockets, for handing them to a new process
    /// in a binary upgrade.
    pub sockets: Vec<std::os::fd::OwnedFd>,
}

impl ListenerHandle {
    /// Stops accepting on every worker, lets open connections finish their
    /// requests for up to `shutdown_grace`, then closes whatever is left.
    pub async fn stop(self) {
        let ListenerHandle { stop, tasks, sockets, .. } = self;
        // The duplicates kept for an upgrade would keep the socket listening,
        // and connections would queue where nothing accepts them any more.
        drop(sockets);
        let _ = stop.send(true);
        futures_util::future::join_all(tasks).await;
    }
}

/// Serves `bound` on every worker: worker `i` accepts on socket `i` (and on
/// `i + workers`, and so on, when inherited sockets outnumber the workers).
pub fn spawn(name: Arc<str>, bound: BoundListener, context: &ServeContext, workers: &Workers) -> ListenerHandle {
    let (stop, stopped) = watch::channel(false);
    let configured = bound.configured;
    let sockets = bound
        .sockets
        .iter()
        .filter_map(|socket| {
            use std::os::fd::AsFd;
            socket
                .as_fd()
                .try_clone_to_owned()
                .inspect_err(|error| {
                    tracing::warn!(listener = %name, %error, "cannot keep a listening socket for a binary upgrade");
                })
                .ok()
        })
        .collect();
    let tasks = bound
        .sockets
        .into_iter()
        .zip(workers.iter().cycle())
        .map(|(socket, (worker, clients))| {
            let stack = stack::build(Arc::clone(&context.live), Arc::clone(clients));
            let (name, context, stopped) = (Arc::clone(&name), context.clone(), stopped.clone());
            worker.spawn(async move {
                match TcpListener::from_std(socket) {
                    Ok(listener) => accept::accept_loop(name, configured, listener, stack, context, stopped).await,
                    Err(error) => tracing::error!(listener = %name, %error, "cannot serve listener socket"),
                }
            })
        })
        .collect();
    ListenerHandle { name, local_addr: bound.local_addr, stop, tasks, sockets }
}
