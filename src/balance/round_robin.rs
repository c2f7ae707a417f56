//! Smooth weighted round robin (nginx's algorithm, `ngx_http_upstream_get_peer`).
//!
//! Over any window of sum(weights) consecutive picks each backend gets exactly its
//! weight, and picks of a heavy backend are spread out rather than bunched. The
//! sequence only depends on the weights, so it is computed once when the config is
//! compiled; a pick is then one atomic increment and an index, with no lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{offer_all_from, Candidate, PickRequest, Policy};
use crate::backend::Backend;
use crate::config::BackendConfig;

/// Sequences longer than this are built from proportionally scaled-down weights,
/// which keeps the table at a few MiB even for 10,000 heavy backends.
const MAX_SEQUENCE: u64 = 1 << 20;
/// Building the sequence costs length x backends steps; weights are scaled down
/// further when that would exceed this (about 30 ms in a release build).
const MAX_BUILD_STEPS: u64 = 32 << 20;

#[derive(Debug)]
pub struct RoundRobin {
    sequence: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub fn new(backends: &[BackendConfig]) -> Self {
        RoundRobin {
            sequence: smooth_sequence(&backends.iter().map(|b| b.weight).collect::<Vec<_>>()),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl Policy for RoundRobin {
    fn walk<T>(
        &self,
        backends: &[Arc<Backend>],
        _request: &PickRequest<'_>,
        advance: bool,
        mut take: impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T> {
        if self.sequence.is_empty() {
            return None;
        }
        let start =
            if advance { self.cursor.fetch_add(1, Ordering::Relaxed) } else { self.cursor.load(Ordering::Relaxed) };
        // A full backend's turn passes to the next in the sequence, which keeps the
        // others' proportions; after a few rounds of misses, a plain scan is cheaper.
        let turns = self.sequence.len().min(4 * backends.len());
        (0..turns)
            .find_map(|step| {
                let index = self.sequence[(start + step) % self.sequence.len()] as usize;
                take(Candidate { index, cap: u32::MAX, ramped: true })
            })
            .or_else(|| offer_all_from(backends, start % backends.len(), u32::MAX, take))
    }
}

/// The smooth weighted round robin order for `weights`, one entry per pick.
pub(crate) fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let weights = reduce(weights);
    if weights.iter().all(|&w| w == 1) {
        // Equal weights: the algorithm degenerates to plain rotation.
        return (0..weights.len() as u32).collect();
    }
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &weight) in weights.iter().enumerate() {
            current[i] += i64::from(weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(best as u32);
    }
    sequence
}

/// Divides weights by their common divisor (1:2:3 and 10:20:30 are the same
/// rotation) and scales them down if the sequence would exceed [`MAX_SEQUENCE`].
fn reduce(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    let max_total = MAX_SEQUENCE.min(MAX_BUILD_STEPS / weights.len().max(1) as u64);
    if total > max_total {
        for w in &mut reduced {
            *w = ((u64::from(*w) * max_total / total) as u32).max(1);
        }
    }
    reduced
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{backends, request};
    use super::*;

    #[test]
    fn smooth_sequence_matches_nginx() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a.
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[10, 20, 30]), smooth_sequence(&[1, 2, 3]));
    }

    #[test]
    fn every_window_of_total_weight_is_exact_and_picks_are_spread() {
        for weights in [&[1u32, 2, 3][..], &[5, 1, 1], &[3, 3, 1, 7]] {
            let specs: Vec<(u32, Option<u32>)> = weights.iter().map(|&w| (w, None)).collect();
            let (configs, runtime) = backends(&specs);
            let rr = RoundRobin::new(&configs);
            let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
            let picks: Vec<usize> =
                (0..600).map(|_| rr.pick(&runtime, &request(&headers, &uri)).unwrap().index).collect();
            let total: u32 = weights.iter().sum();
            // Every window of sum(weights) consecutive picks, at any offset.
            for window in picks.windows(total as usize) {
                for (backend, &weight) in weights.iter().enumerate() {
                    let got = window.iter().filter(|&&p| p == backend).count();
                    assert_eq!(got, weight as usize, "{weights:?}: window {window:?}");
                }
            }
            // Smooth: after any number of picks, each backend is within one pick
            // of its exact share (a a a b c c c ... would be exact per cycle but
            // not smooth).
            let mut counts = vec![0f64; weights.len()];
            for (n, &pick) in picks.iter().enumerate() {
                counts[pick] += 1.0;
                for (backend, &weight) in weights.iter().enumerate() {
                    let share = (n + 1) as f64 * f64::from(weight) / f64::from(total);
                    assert!((counts[backend] - share).abs() < 1.0, "{weights:?}: after {} picks", n + 1);
                }
            }
        }
    }

    #[test]
    fn full_backends_are_skipped() {
        let (configs, runtime) = backends(&[(1, Some(1)), (1, None)]);
        let rr = RoundRobin::new(&configs);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let held = rr.pick(&runtime, &request(&headers, &uri)).unwrap();
        assert_eq!(held.index, 0);
        for _ in 0..10 {
            assert_eq!(rr.pick(&runtime, &request(&headers, &uri)).unwrap().index, 1);
        }
    }

    #[test]
    fn huge_weights_are_scaled_down() {
        let weights = vec![10_000; 1000];
        assert_eq!(smooth_sequence(&weights).len(), 1000);
        let mixed: Vec<u32> = (0..2000).map(|i| 9_000 + i).collect();
        let sequence = smooth_sequence(&mixed);
        assert!(sequence.len() as u64 <= MAX_BUILD_STEPS / 2000 + 2000);
        assert!(mixed.iter().enumerate().all(|(i, _)| sequence.contains(&(i as u32))), "every backend keeps a turn");
    }
}
