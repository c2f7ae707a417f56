//! A listener's accept loop on one worker: accept, wait for a place under
//! `max_connections`, start the connection's task, and ask connections that
//! stay idle to close; when the listener stops, the drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::connection::{self, connection_builder, Activity};
use super::drain;
use super::stack::WorkerStack;
use super::ServeContext;
use crate::conn::{ConnectionSlot, TunnelHome};

pub(super) async fn accept_loop(
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
            slot: Arc::new(ConnectionSlot::new(permit, open.clone(), Arc::clone(&context.connection_count))),
            tracker: tunnels.clone(),
            stopped: stopped.clone(),
            shutdown_grace: limits.shutdown_grace,
            idle_timeout: limits.tunnel_idle_timeout,
        };
        let activity = Arc::new(Activity::new());
        let record = Watched { activity: Arc::clone(&activity), finished_before: 0, quiet_ticks: 0 };
        let accepted = connection::Accepted {
            stream,
            client,
            proxy_protocol,
            tls,
            limits,
            home,
            activity,
            listener: Arc::clone(&name),
            bind: configured,
        };
        let task = connections.spawn(connection::serve(accepted, Arc::clone(&builder), stack.clone()));
        watched.insert(task.id(), record);
        if stopping {
            break;
        }
    }
    drop(listener);
    let activities = watched.into_values().map(|connection| connection.activity).collect();
    let grace = context.live.load().limits.shutdown_grace;
    drain::drain(&name, activities, connections, tunnels, grace).await;
}

/// Whether the live config's listener at `configured` takes PROXY headers;
/// `None` when the live config has no such listener.
fn proxy_protocol_of(config: &crate::config::Config, configured: SocketAddr) -> Option<bool> {
    config.listeners.iter().find(|listener| listener.bind == configured).map(|l| l.proxy_protocol)
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

/// Idle ticks per `idle_timeout` (see `close_idle`).
const IDLE_TICKS: u32 = 4;
