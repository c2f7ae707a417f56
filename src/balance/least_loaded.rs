//! Least loaded by power of two choices over a latency-weighted load.
//!
//! Two backends are drawn at random and the cheaper one wins (Mitzenmacher,
//! "The Power of Two Choices in Randomized Load Balancing", 2001): O(1) per
//! request, and no herd of requests on one momentarily idle backend. The cost
//! is `in_flight * latency_estimate / weight`, with the peak-EWMA latency of
//! Finagle's and linkerd's balancer, and `weight` scaled down during slow start.
//!
//! Unlike Finagle's `(in_flight + 1) * latency`, an idle backend costs nothing,
//! whatever its latency estimate. Bot jobs last as long as the job, not the bot,
//! so one slow call (a cold start, a long job) says little about a bot; with the
//! `+ 1`, a bot whose last call was slow lost every comparison while it sat
//! idle. Latency still decides between busy backends, so a backend that is
//! really slow gets little work under concurrency: it holds its requests for
//! longer, so it is busy whenever it is compared. Two idle candidates are
//! chosen between in proportion to their weights. Before both have a latency
//! sample, the cost is `in_flight / weight`.

use std::sync::Arc;

use super::{offer_all_from, Candidate, PickRequest, Policy};
use crate::backend::Backend;
use crate::clock::nanos_since_epoch;

#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn walk<T>(
        &self,
        backends: &[Arc<Backend>],
        _request: &PickRequest<'_>,
        _advance: bool,
        mut take: impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T> {
        let n = backends.len();
        if n <= 1 {
            return offer_all_from(backends, 0, u32::MAX, take);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        let now = nanos_since_epoch();
        let (first, second) = if prefer(&backends[b], &backends[a], now) { (b, a) } else { (a, b) };
        // Slow start also thins a ramping winner's turns (see `Candidate::ramped`),
        // so it ramps up even while it is idle and would win every comparison.
        take(Candidate { index: first, cap: u32::MAX, ramped: true })
            .or_else(|| take(Candidate { index: second, cap: u32::MAX, ramped: true }))
            .or_else(|| offer_all_from(backends, a, u32::MAX, take))
    }
}

/// `in_flight * latency / effective weight`; without a latency, `in_flight /
/// effective weight`.
fn cost(backend: &Backend, now: u64, latency: Option<f64>) -> f64 {
    f64::from(backend.in_flight()) * latency.unwrap_or(1.0) / backend.effective_weight(now).max(f64::MIN_POSITIVE)
}

/// Whether `x` should get the next request rather than `y`.
fn prefer(x: &Backend, y: &Backend, now: u64) -> bool {
    let (x_available, y_available) = (x.is_available(), y.is_available());
    if x_available != y_available {
        return x_available;
    }
    // Latency weighs in only when both have a sample.
    let latencies = (x.state.latency.estimate_at(now), y.state.latency.estimate_at(now));
    let (lx, ly) = if latencies.0.is_some() && latencies.1.is_some() { latencies } else { (None, None) };
    let (cx, cy) = (cost(x, now, lx), cost(y, now, ly));
    if cx != cy {
        return cx < cy;
    }
    // A tie (both idle, most often): by weight.
    let (wx, wy) = (x.effective_weight(now), y.effective_weight(now));
    fastrand::f64() * (wx + wy) < wx
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
    fn an_idle_backend_wins_whatever_its_last_latency() {
        let (_, runtime) = backends(&[(1, None), (1, None), (1, None)]);
        // One cold, slow first call on bot 0, fast calls on the others.
        runtime[0].state.latency.observe(Duration::from_secs(5));
        runtime[1].state.latency.observe(Duration::from_millis(10));
        runtime[2].state.latency.observe(Duration::from_millis(10));
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        // Sequential calls: each finishes before the next starts.
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap().index] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "idle bots share sequential calls evenly: {counts:?}");
        }
    }

    #[test]
    fn idle_backends_share_by_weight_and_slow_start_thins_a_ramping_one() {
        let (_, runtime) = backends(&[(1, None), (3, None)]);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let mut counts = [0usize; 2];
        for _ in 0..4000 {
            counts[LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap().index] += 1;
        }
        assert!((800..1200).contains(&counts[0]), "weights 1:3 give about 1000:3000: {counts:?}");

        // Backend 0 was just added with a 100 s slow start: it gets about a
        // tenth of its fair share at first.
        let (configs, _) = backends(&[(1, None), (1, None)]);
        let ramping = Arc::new(Backend {
            slow_start: Some(Duration::from_secs(100)),
            state: Arc::new(crate::backend::BackendState::added_now()),
            ..Backend::detached(&configs[0])
        });
        let runtime = vec![ramping, Arc::new(Backend::detached(&configs[1]))];
        let mut ramped = 0;
        for _ in 0..4000 {
            ramped += usize::from(LeastLoaded.pick(&runtime, &request(&headers, &uri)).unwrap().index == 0);
        }
        assert!(ramped < 600, "a backend at 10% of its ramp got {ramped} of 4000");
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
