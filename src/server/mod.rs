//! Listeners: accept connections, speak HTTP/1.1 or h2c (prior knowledge) on the
//! same port, hand each request to the proxy stack, and drain gracefully.
//!
//! One accept task per listener per worker (see `workers`), each on its own
//! `SO_REUSEPORT` socket. Each connection gets hyper-util's auto builder, which
//! sniffs the HTTP/2 preface, so one port serves both protocols. At
//! `max_connections` each worker holds the one connection it accepted until a
//! place frees and stops accepting: the rest wait in the kernel backlog
//! instead of being accepted and dropped.

mod admission;
mod proxy_protocol;
pub mod stack;
pub mod workers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::conn::{ConnInfo, ConnectionSlot, SendTimeoutIo, TunnelHome};
use crate::state::Live;
use crate::stream_timeout::StreamExecutor;
use crate::tls::ClientStream;
use stack::WorkerStack;
use workers::Workers;

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

/// Everything a listener task needs besides its socket.
#[derive(Clone)]
pub struct ServeContext {
    /// Read per request for routes and upstreams, and at each accept for the
    /// current limits, so a reload's new limits apply to new connections
    /// without restarting listeners.
    pub live: Live,
    /// Shared by all listeners and workers: `max_connections` is a
    /// process-wide cap.
    pub connections: Arc<Semaphore>,
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
                    Ok(listener) => accept_loop(name, configured, listener, stack, context, stopped).await,
                    Err(error) => tracing::error!(listener = %name, %error, "cannot serve listener socket"),
                }
            })
        })
        .collect();
    ListenerHandle { name, local_addr: bound.local_addr, stop, tasks, sockets }
}

fn connection_builder(limits: &Limits) -> Arc<auto::Builder<StreamExecutor>> {
    let mut builder = auto::Builder::new(StreamExecutor { send_timeout: limits.client_send_timeout });
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    Arc::new(builder)
}

async fn accept_loop(
    name: Arc<str>,
    configured: SocketAddr,
    listener: TcpListener,
    stack: WorkerStack,
    context: ServeContext,
    mut stopped: watch::Receiver<bool>,
) {
    let mut limits = context.live.load().limits;
    // Read again at each accept (a reload may turn it on or off); this is
    // the answer for a listener the live config no longer has (it is being
    // stopped): what it was started with, never a silent "off".
    let mut proxy_protocol = proxy_protocol_of(&context.live.load().config, configured).unwrap_or(false);
    let mut builder = connection_builder(&limits);
    let mut connections = JoinSet::new();
    // Upgraded connections (WebSocket) outlive hyper's connection task; the
    // drain waits for them too.
    let tunnels = TaskTracker::new();
    let open = crate::metrics::connections_open(&name);
    // Present from the start, at whatever count this listener name has.
    open.increment(0.0);
    // The open connections, judged idle here on one timer for all of them
    // rather than on a timer and a shutdown watch polled in every connection.
    // Each leaves the moment its task ends: a record kept until the next
    // idle tick (up to a quarter of a long `idle_timeout`) would hold the
    // finished task's memory through its waker, for every short connection.
    let mut watched: HashMap<tokio::task::Id, Watched> = HashMap::new();
    let idle_tick = tokio::time::sleep(limits.idle_timeout / IDLE_TICKS);
    tokio::pin!(idle_tick);
    let next_tick =
        |context: &ServeContext| tokio::time::Instant::now() + context.live.load().limits.idle_timeout / IDLE_TICKS;
    loop {
        let (stream, client) = tokio::select! {
            _ = stopped.changed() => break,
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                forget(&mut watched, ended);
                continue;
            }
            () = &mut idle_tick => {
                close_idle(&mut watched);
                idle_tick.as_mut().reset(next_tick(&context));
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    crate::conn::accept_failed(&name, &error).await;
                    continue;
                }
            },
        };
        // The cap is taken after accept: with one socket per worker, a worker
        // holding a permit while it waits in `accept` could keep it from the
        // worker whose socket the next connection landed on. So each worker
        // holds at most one accepted connection until a place frees, and
        // everything beyond waits in the kernel's backlog.
        let acquire = Arc::clone(&context.connections).acquire_owned();
        tokio::pin!(acquire);
        let mut stopping = false;
        let permit = loop {
            tokio::select! {
                // Dropping the connection would reset a client the kernel
                // already accepted for us: it is served, over the cap, as the
                // listener drains.
                _ = stopped.changed() => {
                    stopping = true;
                    break Arc::new(Semaphore::new(1)).acquire_owned().await.expect("a fresh semaphore");
                }
                Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => forget(&mut watched, ended),
                // Idle connections are what frees a place.
                () = &mut idle_tick => {
                    close_idle(&mut watched);
                    idle_tick.as_mut().reset(next_tick(&context));
                }
                permit = &mut acquire => break permit.expect("semaphore never closed"),
            }
        };
        let _ = stream.set_nodelay(true);
        let (current, tls, listener_proxy_protocol) = {
            let snapshot = context.live.load();
            (snapshot.limits, snapshot.tls.get(&configured).cloned(), proxy_protocol_of(&snapshot.config, configured))
        };
        proxy_protocol = listener_proxy_protocol.unwrap_or(proxy_protocol);
        if current != limits {
            limits = current;
            builder = connection_builder(&limits);
        }
        let home = TunnelHome {
            slot: Arc::new(ConnectionSlot::new(permit, open.clone())),
            tracker: tunnels.clone(),
            stopped: stopped.clone(),
            shutdown_grace: limits.shutdown_grace,
            idle_timeout: limits.tunnel_idle_timeout,
        };
        let activity = Arc::new(Activity::new());
        let record = Watched { activity: Arc::clone(&activity), finished_before: 0, quiet_ticks: 0 };
        let (builder, stack, name) = (Arc::clone(&builder), stack.clone(), Arc::clone(&name));
        let task = connections.spawn(async move {
            // The PROXY header and the TLS handshake are read on the
            // connection's own task, so a slow client never holds up the
            // accept loop; both are bounded.
            let mut stream = stream;
            let mut client = client;
            if proxy_protocol {
                match proxy_protocol::read_header(&mut stream, limits.header_read_timeout).await {
                    Ok(Some(named)) => client = named,
                    // The balancer's own connection (its health check).
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(listener = %name, peer = %client, %error, "connection refused: no PROXY header");
                        return;
                    }
                }
            }
            let mut info = ConnInfo::new(client, name);
            info.tunnels = Some(home);
            let stream = match tls {
                None => ClientStream::Plain(stream),
                Some(config) => match handshake(config, stream, limits.tls_handshake_timeout, &info.listener).await {
                    Some(stream) => {
                        info.tls = true;
                        stream
                    }
                    None => return,
                },
            };
            let service = TowerToHyperService::new(stack.for_connection(Arc::new(info), Arc::clone(&activity)));
            let io = TokioIo::new(SendTimeoutIo::new(stream, limits.client_send_timeout));
            let connection = builder.serve_connection_with_upgrades(io, service).into_owned();
            drive_connection(connection, activity, limits.client_send_timeout).await;
        });
        watched.insert(task.id(), record);
        if stopping {
            break;
        }
    }
    drop(listener);
    // A keep-alive client is told to go elsewhere on a response (`Connection:
    // close`) rather than by a close that can cross its next request on the
    // wire: its request in flight, or the next one it sends within the
    // linger, gets that answer. Then whatever is still open is closed
    // gracefully (HTTP/2 gets GOAWAY).
    for connection in watched.values() {
        connection.activity.draining.store(true, Ordering::Release);
    }
    let grace = context.live.load().limits.shutdown_grace;
    let linger = tokio::time::sleep(DRAIN_LINGER.min(grace / 2));
    tokio::pin!(linger);
    while !connections.is_empty() {
        tokio::select! {
            () = &mut linger => break,
            _ = connections.join_next() => {}
        }
    }
    for connection in watched.values() {
        connection.activity.ask_to_close();
    }
    tunnels.close();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
        tunnels.wait().await;
    });
    if drained.await.is_err() {
        tracing::warn!(listener = %name, open = connections.len(), tunnels = tunnels.len(),
            "shutdown grace period over; closing remaining connections");
        connections.abort_all();
        // Tunnels end themselves at the same grace (see `proxy/tunnel.rs`).
        let _ = tokio::time::timeout(Duration::from_secs(1), tunnels.wait()).await;
    }
}

/// Whether the live config's listener at `configured` takes PROXY headers;
/// `None` when the live config has no such listener.
fn proxy_protocol_of(config: &crate::config::Config, configured: SocketAddr) -> Option<bool> {
    config.listeners.iter().find(|listener| listener.bind == configured).map(|l| l.proxy_protocol)
}

/// The server side of a TLS handshake, bounded by `timeout`; `None` (and the
/// connection closed) when it fails or takes too long.
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    stream: tokio::net::TcpStream,
    timeout: Duration,
    listener: &str,
) -> Option<ClientStream> {
    let accepted = tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(config).accept(stream)).await;
    let (result, stream) = match accepted {
        Ok(Ok(stream)) => ("ok", Some(ClientStream::Tls(Box::new(stream)))),
        Ok(Err(error)) => {
            tracing::debug!(listener, %error, "TLS handshake failed");
            ("failed", None)
        }
        Err(_) => ("timeout", None),
    };
    crate::metrics::tls_handshake(listener, result);
    stream
}

/// Serves one connection until it ends, asking it to finish gracefully
/// (complete the request in progress, then close) when the accept loop says
/// so: the listener stops, or no request has been active for `idle_timeout`.
/// Per wake this costs one flag read: the waker is handed over once.
///
/// A connection asked to close that has no response of ours in progress but
/// does not end is closed outright after `linger` (`client_send_timeout`):
/// an HTTP/2 client that gives its streams no window keeps their last bytes
/// in the connection's send buffers, and a graceful shutdown would wait for
/// them for ever.
async fn drive_connection(connection: ClientConnection, activity: Arc<Activity>, linger: Duration) {
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let mut registered: Option<Waker> = None;
    // Made only for a connection that lingers after it was asked to close.
    let mut cut: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let result = std::future::poll_fn(|cx| {
        if !closing {
            // Registered before the flag is read: a close asked in between still wakes us.
            if !registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                activity.waker.register(cx.waker());
                registered = Some(cx.waker().clone());
            }
            if activity.close.load(Ordering::Acquire) {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
        if let Poll::Ready(result) = std::future::Future::poll(connection.as_mut(), cx) {
            return Poll::Ready(result);
        }
        if !(closing && activity.is_idle()) {
            cut = None;
            return Poll::Pending;
        }
        let timer = cut.get_or_insert_with(|| Box::pin(tokio::time::sleep(linger)));
        match std::future::Future::poll(timer.as_mut(), cx) {
            Poll::Ready(()) => {
                tracing::debug!(?linger, "a closing connection's client took nothing more; closing it");
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// A connection as its accept loop watches it for idleness.
struct Watched {
    activity: Arc<Activity>,
    finished_before: usize,
    quiet_ticks: u32,
}

/// One idle tick (a quarter of `idle_timeout`): a connection with nothing
/// running and nothing finished for `IDLE_TICKS` ticks in a row is asked to
/// close, i.e. between 1 and 1.25 x `idle_timeout` after its last request;
/// requests themselves never read the clock for it. Ended connections are
/// let go.
fn close_idle(watched: &mut HashMap<tokio::task::Id, Watched>) {
    watched.retain(|_, connection| {
        if Arc::strong_count(&connection.activity) == 1 {
            return false;
        }
        let finished = connection.activity.finished();
        if connection.activity.is_idle() && finished == connection.finished_before {
            connection.quiet_ticks += 1;
        } else {
            connection.quiet_ticks = 0;
        }
        connection.finished_before = finished;
        if connection.quiet_ticks >= IDLE_TICKS {
            connection.activity.ask_to_close();
            return false;
        }
        true
    });
}

/// Lets go of the record of a connection whose task ended, however it ended.
fn forget(
    watched: &mut HashMap<tokio::task::Id, Watched>,
    ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) {
    let id = match ended {
        Ok((id, ())) => id,
        Err(error) => error.id(),
    };
    watched.remove(&id);
}

/// One client connection as hyper-util's auto builder serves it.
type ClientConnection = auto::UpgradeableConnection<
    'static,
    TokioIo<SendTimeoutIo<ClientStream>>,
    TowerToHyperService<stack::ForConnection>,
    StreamExecutor,
>;

/// Whether a connection has a request in progress and how many it finished,
/// and the accept loop's way to ask it to close.
struct Activity {
    active: AtomicUsize,
    /// Requests finished so far.
    finished: AtomicUsize,
    close: AtomicBool,
    /// Its listener stopped accepting: HTTP/1.1 responses carry
    /// `Connection: close` (see the end of `accept_loop`).
    draining: AtomicBool,
    waker: AtomicWaker,
}

/// How long a stopping listener lets keep-alive connections send one more
/// request, answered with `Connection: close`, before it closes them.
const DRAIN_LINGER: Duration = Duration::from_secs(2);

/// Idle ticks per `idle_timeout` (see `close_idle`).
const IDLE_TICKS: u32 = 4;

impl Activity {
    fn new() -> Self {
        Activity {
            active: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            close: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Has the connection finish its request in progress, then close.
    fn ask_to_close(&self) {
        self.close.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn request_started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    fn request_finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }

    fn finished(&self) -> usize {
        self.finished.load(Ordering::Relaxed)
    }
}
