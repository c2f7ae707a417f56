//! Weighted random: each pick independent, P(backend) = weight / sum(weights).
//!
//! Cumulative weights are precomputed, so a pick is one random number and a
//! binary search.

use std::sync::Arc;

use super::{offer_all_from, Candidate, PickRequest, Policy};
use crate::backend::Backend;
use crate::config::BackendConfig;

/// Random draws before giving up on luck and scanning for any free backend.
const DRAWS: usize = 3;

#[derive(Debug)]
pub struct WeightedRandom {
    /// `cumulative[i]` is the sum of weights of backends `0..=i`.
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    pub fn new(backends: &[BackendConfig]) -> Self {
        let cumulative = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += u64::from(b.weight);
                Some(*sum)
            })
            .collect();
        WeightedRandom { cumulative }
    }

    fn draw(&self) -> usize {
        let total = *self.cumulative.last().unwrap_or(&0);
        let point = fastrand::u64(0..total.max(1));
        self.cumulative.partition_point(|&c| c <= point)
    }
}

impl Policy for WeightedRandom {
    fn walk<T>(
        &self,
        backends: &[Arc<Backend>],
        _request: &PickRequest<'_>,
        _advance: bool,
        mut take: impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T> {
        if backends.is_empty() {
            return None;
        }
        (0..DRAWS)
            .find_map(|_| take(Candidate { index: self.draw(), cap: u32::MAX, ramped: true }))
            .or_else(|| offer_all_from(backends, fastrand::usize(..backends.len()), u32::MAX, take))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{backends, request};
    use super::*;

    #[test]
    fn picks_follow_weights() {
        let (configs, runtime) = backends(&[(1, None), (3, None)]);
        let random = WeightedRandom::new(&configs);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let mut counts = [0u32; 2];
        for _ in 0..40_000 {
            counts[random.pick(&runtime, &request(&headers, &uri)).unwrap().index] += 1;
        }
        let share = f64::from(counts[1]) / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "share of weight 3 was {share}");
    }
}
