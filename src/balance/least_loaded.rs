//! Least loaded by power of two choices over peak-EWMA cost.
//!
//! Two backends are drawn at random and the cheaper one wins, where cost is
//! `(in_flight + 1) * latency_estimate / weight` (the cost of Finagle's and
//! linkerd's P2C + PeakEWMA balancer; Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 2001). Comparing two random backends instead of
//! scanning all of them is O(1) and avoids the herd effect of every proxy sending
//! to the same momentarily least-loaded backend. Until both candidates have a
//! latency sample, they are compared by `in_flight / weight` alone.

use std::sync::Arc;

use super::{acquire_unramped, first_available_from, Pick, PickRequest, Policy};
use crate::upstream::Backend;

#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn pick(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<Pick> {
        let n = backends.len();
        if n <= 1 {
            return first_available_from(backends, request, 0);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        let (first, second) = if cheaper(&backends[b], &backends[a]) { (b, a) } else { (a, b) };
        acquire_unramped(backends, request, first, u32::MAX)
            .or_else(|| acquire_unramped(backends, request, second, u32::MAX))
            .or_else(|| first_available_from(backends, request, a))
    }
}

/// The available backend with the lowest cost, for `/explain`.
pub fn cheapest(backends: &[Arc<Backend>]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (index, backend) in backends.iter().enumerate() {
        if backend.is_available() && best.is_none_or(|b| cheaper(backend, &backends[b])) {
            best = Some(index);
        }
    }
    best
}

/// Whether `x` should get the next request rather than `y`.
fn cheaper(x: &Backend, y: &Backend) -> bool {
    if x.is_available() != y.is_available() {
        return x.is_available();
    }
    let load = |b: &Backend| f64::from(b.in_flight());
    match (x.state.latency.estimate(), y.state.latency.estimate()) {
        (Some(lx), Some(ly)) => (load(x) + 1.0) * lx / f64::from(x.weight) < (load(y) + 1.0) * ly / f64::from(y.weight),
        _ => load(x) / f64::from(x.weight) < load(y) / f64::from(y.weight),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{backends, request};
    use super::*;

    #[test]
    fn an_idle_backend_beats_a_busy_one() {
        let (_, runtime) = backends(&[(1, None), (1, None)]);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let busy = LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap();
        for _ in 0..50 {
            let pick = LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap();
            assert_ne!(pick.index, busy.index);
        }
    }

    #[test]
    fn a_slow_backend_gets_little_traffic() {
        let (_, runtime) = backends(&[(1, None), (1, None), (1, None)]);
        runtime[0].state.latency.observe(Duration::from_millis(100));
        runtime[1].state.latency.observe(Duration::from_millis(10));
        runtime[2].state.latency.observe(Duration::from_millis(10));
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let mut held = Vec::new();
        let mut slow = 0;
        // Requests pile up (none complete), so cost grows with in-flight count.
        for _ in 0..300 {
            let pick = LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap();
            slow += usize::from(pick.index == 0);
            held.push(pick);
        }
        assert!(slow < 60, "slow backend got {slow} of 300");
    }
}
