//! How a stopping listener's connections end: keep-alive clients are told to
//! go elsewhere on a response, then what is still open is closed gracefully
//! within `shutdown_grace`, then cut.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::connection::Activity;

/// How long a stopping listener lets keep-alive connections send one more
/// request, answered with `Connection: close`, before it closes them.
const DRAIN_LINGER: Duration = Duration::from_secs(2);

/// Drains a stopped listener's `connections` (their `activities`) and its
/// WebSocket `tunnels` within `grace`.
pub(super) async fn drain(
    name: &str,
    activities: Vec<Arc<Activity>>,
    mut connections: JoinSet<()>,
    tunnels: TaskTracker,
    grace: Duration,
) {
    // A keep-alive client is told to go elsewhere on a response (`Connection:
    // close`) rather than by a close that can cross its next request on the
    // wire: its request in flight, or the next one it sends within the
    // linger, gets that answer. Then whatever is still open is closed
    // gracefully (HTTP/2 gets GOAWAY).
    for activity in &activities {
        activity.draining.store(true, Ordering::Release);
    }
    let linger = tokio::time::sleep(DRAIN_LINGER.min(grace / 2));
    tokio::pin!(linger);
    while !connections.is_empty() {
        tokio::select! {
            () = &mut linger => break,
            _ = connections.join_next() => {}
        }
    }
    for activity in &activities {
        activity.ask_to_close();
    }
    tunnels.close();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
        tunnels.wait().await;
    });
    if drained.await.is_err() {
        tracing::warn!(
            listener = name,
            open = connections.len(),
            tunnels = tunnels.len(),
            "shutdown grace period over; closing remaining connections"
        );
        connections.abort_all();
        // Tunnels end themselves at the same grace (see `proxy/tunnel.rs`).
        let _ = tokio::time::timeout(Duration::from_secs(1), tunnels.wait()).await;
    }
}
