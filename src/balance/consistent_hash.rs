//! Consistent hashing on a ring, with optional bounded load.
//!
//! Each backend owns `POINTS_PER_WEIGHT x weight` points on a 64-bit ring, placed
//! by hashing its address (xxh3, seeded by the point number). A key goes to the
//! owner of the first point at or after the key's hash. Point positions depend
//! only on a backend's own address and weight, so removing one of N backends moves
//! exactly the keys it owned and no others, and two proxies with the same backend
//! set agree on every key.
//!
//! With `bounded_load: c`, a backend takes a request only while its in-flight
//! count is below `ceil(c x (total_in_flight + 1) / backends)`; otherwise the key
//! walks on clockwise to the next backend (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", 2018). Requests without a key are
//! balanced round robin.

use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{extract_key, offer_all_from, Candidate, PickRequest, Policy, RoundRobin};
use crate::backend::{Backend, UpstreamLoad};
use crate::config::{BackendConfig, KeySpec};

/// Enough points per unit of weight for an even spread (a standard deviation of
/// about 10% of the mean share with 100 points).
const POINTS_PER_WEIGHT: u32 = 100;
/// Caps one backend's points, so weights above 100 saturate on the ring.
const MAX_POINTS_PER_BACKEND: u32 = 10_000;
/// Caps the whole ring (16 bytes a point: 16 MiB), whatever the backends and
/// weights (a discovered set is as large as the DNS answer allows). Beyond
/// it every backend's points are scaled down alike, at least one each.
const MAX_RING_POINTS: u64 = 1 << 20;

#[derive(Debug)]
pub struct ConsistentHash {
    /// (point hash, backend index), sorted by hash.
    ring: Vec<(u64, u32)>,
    key: KeySpec,
    bounded_load: Option<f64>,
    /// The upstream's in-flight total; its backends keep it (see `Backend::load`).
    load: Arc<UpstreamLoad>,
    keyless: RoundRobin,
}

impl ConsistentHash {
    pub fn new(backends: &[BackendConfig], key: KeySpec, bounded_load: Option<f64>) -> Self {
        let points_of =
            |backend: &BackendConfig| POINTS_PER_WEIGHT.saturating_mul(backend.weight).min(MAX_POINTS_PER_BACKEND);
        let total: u64 = backends.iter().map(|b| u64::from(points_of(b))).sum();
        let scale = |points: u32| match total > MAX_RING_POINTS {
            true => ((u64::from(points) * MAX_RING_POINTS / total) as u32).max(1),
            false => points,
        };
        let mut ring = Vec::with_capacity(total.min(MAX_RING_POINTS + backends.len() as u64) as usize);
        for (index, backend) in backends.iter().enumerate() {
            let points = scale(points_of(backend));
            for point in 0..points {
                ring.push((xxh3_64_with_seed(backend.address.as_bytes(), u64::from(point)), index as u32));
            }
        }
        ring.sort_unstable();
        ConsistentHash { ring, key, bounded_load, load: Arc::default(), keyless: RoundRobin::new(backends) }
    }

    fn first_point(&self, key_hash: u64) -> usize {
        let position = self.ring.partition_point(|&(point, _)| point < key_hash);
        if position == self.ring.len() {
            0
        } else {
            position
        }
    }

    /// The bound on any backend's in-flight count: the factor times the mean
    /// over the backends that can serve (healthy, not ejected, circuit not
    /// open). Backends that cannot serve neither take load nor dilute the mean.
    fn load_cap(&self, backends: &[Arc<Backend>]) -> u32 {
        let Some(factor) = self.bounded_load else {
            return u32::MAX;
        };
        let (total, serving) = self.load.serving_load(backends);
        let cap = (factor * (total + 1) as f64 / serving.max(1) as f64).ceil();
        cap.min(f64::from(u32::MAX)) as u32
    }
}

impl ConsistentHash {
    /// Offers each distinct backend once, in ring order from `start`.
    fn offer_ring_from<T>(
        &self,
        start: usize,
        backends: &[Arc<Backend>],
        cap: u32,
        ramped: bool,
        take: &mut impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T> {
        let mut offered = vec![false; backends.len()];
        let mut remaining = backends.len();
        for step in 0..self.ring.len() {
            if remaining == 0 {
                break;
            }
            let index = self.ring[(start + step) % self.ring.len()].1 as usize;
            if std::mem::replace(&mut offered[index], true) {
                continue;
            }
            remaining -= 1;
            if let Some(taken) = take(Candidate { index, cap, ramped }) {
                return Some(taken);
            }
        }
        None
    }
}

/// The hash used for request keys; exposed so tests can reproduce a mapping.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

impl ConsistentHash {
    /// The backend that owns a key on the ring (its index in the backend
    /// list the policy was built from), load and health aside: what every
    /// replica with the same backends maps the key to. `None` with no backends.
    pub fn owner_of(&self, key: &[u8]) -> Option<usize> {
        (!self.ring.is_empty()).then(|| self.ring[self.first_point(hash_key(key))].1 as usize)
    }

    pub fn key(&self) -> &KeySpec {
        &self.key
    }

    /// The running total its backends must keep (`Backend::load`), when bounded.
    pub fn upstream_load(&self) -> Option<&Arc<UpstreamLoad>> {
        self.bounded_load.is_some().then_some(&self.load)
    }
}

impl Policy for ConsistentHash {
    fn walk<T>(
        &self,
        backends: &[Arc<Backend>],
        request: &PickRequest<'_>,
        advance: bool,
        mut take: impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T> {
        if self.ring.is_empty() {
            return None;
        }
        let Some(key_hash) = extract_key(&self.key, request, hash_key) else {
            return self.keyless.walk(backends, request, advance, take);
        };
        let start = self.first_point(key_hash);
        let cap = self.load_cap(backends);
        let owner = self.ring[start].1 as usize;
        if let Some(taken) = take(Candidate { index: owner, cap, ramped: true }) {
            return Some(taken);
        }
        // Walk clockwise, offering each distinct backend once; then once more
        // without slow start's thinning, still under the cap: with bounded load,
        // a full ring means no backend may take the request (it queues or fails).
        self.offer_ring_from(start, backends, cap, true, &mut take)
            .or_else(|| self.offer_ring_from(start, backends, cap, false, &mut take))
            .or_else(
                || if self.bounded_load.is_none() { offer_all_from(backends, owner, u32::MAX, take) } else { None },
            )
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{backends, request};
    use super::*;

    fn key_request(key: &str) -> (http::HeaderMap, http::Uri) {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-job-id", key.parse().unwrap());
        (headers, http::Uri::from_static("/"))
    }

    fn map_keys(configs: &[BackendConfig], runtime: &[Arc<Backend>]) -> Vec<String> {
        let policy = ConsistentHash::new(configs, "header:x-job-id".parse().unwrap(), None);
        (0..1000)
            .map(|k| {
                let (headers, uri) = key_request(&format!("job-{k}"));
                let pick = policy.pick(runtime, &request(&headers, &uri)).unwrap();
                runtime[pick.index].address.to_string()
            })
            .collect()
    }

    #[test]
    fn the_ring_has_a_bounded_size_whatever_the_backends_and_weights() {
        let many: Vec<BackendConfig> = (0..3000)
            .map(|i| BackendConfig {
                address: format!("10.{}.{}.1:8270", i / 250, i % 250),
                weight: 10_000,
                max_concurrency: None,
            })
            .collect();
        let policy = ConsistentHash::new(&many, "header:x-job-id".parse().unwrap(), None);
        assert!(policy.ring.len() as u64 <= MAX_RING_POINTS, "{} points", policy.ring.len());
        let owners: std::collections::HashSet<u32> = policy.ring.iter().map(|(_, index)| *index).collect();
        assert_eq!(owners.len(), many.len(), "every backend keeps points");
    }

    #[test]
    fn backends_in_any_order_map_every_key_alike_and_each_owns_a_share() {
        // Replicas list the same backends in their own order (a DNS answer,
        // an edited file): the key's backend must not depend on it.
        let (configs, runtime) = backends(&[(1, None); 5]);
        let orders: [[usize; 5]; 3] = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]];
        let mappings: Vec<Vec<String>> = orders
            .iter()
            .map(|order| {
                let configs: Vec<BackendConfig> = order.iter().map(|&i| configs[i].clone()).collect();
                let runtime: Vec<Arc<Backend>> = order.iter().map(|&i| Arc::clone(&runtime[i])).collect();
                let policy = ConsistentHash::new(&configs, "header:x-job-id".parse().unwrap(), None);
                (0..10_000)
                    .map(|k| {
                        let (headers, uri) = key_request(&format!("job-{k}"));
                        let pick = policy.pick(&runtime, &request(&headers, &uri)).unwrap();
                        runtime[pick.index].address.to_string()
                    })
                    .collect()
            })
            .collect();
        for (i, mapping) in mappings.iter().enumerate().skip(1) {
            let differ = mapping.iter().zip(&mappings[0]).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "order {i} maps {differ} of 10,000 keys elsewhere");
        }
        for backend in &runtime {
            let owned = mappings[0].iter().filter(|address| **address == *backend.address).count();
            assert!(owned > 500, "backend {} owns {owned} of 10,000 keys", backend.address);
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let (configs, runtime) = backends(&[(1, None); 5]);
        let before = map_keys(&configs, &runtime);
        let removed = runtime[2].address.to_string();
        let (mut configs4, mut runtime4) = (configs.clone(), runtime.clone());
        configs4.remove(2);
        runtime4.remove(2);
        let after = map_keys(&configs4, &runtime4);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b == &removed {
                moved += 1;
            } else {
                assert_eq!(b, a, "a key not on the removed backend moved");
            }
        }
        assert!(moved > 100 && moved < 300, "about a fifth of keys were on the removed backend: {moved}");
    }

    /// Backends keeping the policy's running total, as a compiled upstream's do.
    fn attached(policy: &ConsistentHash, configs: &[BackendConfig]) -> Vec<Arc<Backend>> {
        configs
            .iter()
            .map(|c| Arc::new(Backend { load: policy.upstream_load().cloned(), ..Backend::detached(c) }))
            .collect()
    }

    #[test]
    fn bounded_load_spills_to_the_next_backend() {
        let (configs, _) = backends(&[(1, None); 4]);
        let policy = ConsistentHash::new(&configs, "header:x-job-id".parse().unwrap(), Some(1.25));
        let runtime = attached(&policy, &configs);
        let (headers, uri) = key_request("hot");
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(policy.pick(&runtime, &request(&headers, &uri)).unwrap());
            let total: u32 = runtime.iter().map(|b| b.in_flight()).sum();
            let mean = f64::from(total) / 4.0;
            for b in &runtime {
                assert!(f64::from(b.in_flight()) <= (1.25 * mean).ceil(), "{} over bound", b.in_flight());
            }
        }
    }

    #[test]
    fn bounded_load_holds_over_the_backends_that_can_serve() {
        let (configs, _) = backends(&[(1, None); 4]);
        let policy = ConsistentHash::new(&configs, "header:x-job-id".parse().unwrap(), Some(1.25));
        let runtime = attached(&policy, &configs);
        // Two of four are ejected: the mean is over the two that serve.
        let far_future = u64::MAX / 2;
        runtime[0].state.passive.eject_until_for_test(far_future);
        runtime[1].state.passive.eject_until_for_test(far_future);
        let mut held = Vec::new();
        for key in 0..40 {
            let (headers, uri) = key_request(if key % 5 == 0 { "cold" } else { "hot" });
            let pick = policy.pick(&runtime, &request(&headers, &uri)).expect("a serving backend is below the cap");
            assert!(pick.index >= 2, "an ejected backend was picked");
            held.push(pick);
            let (a, b) = (runtime[2].in_flight(), runtime[3].in_flight());
            let mean = f64::from(a + b) / 2.0;
            assert!(f64::from(a.max(b)) <= (1.25 * mean).ceil(), "{a} and {b}: over the bound");
        }
    }

    #[test]
    fn missing_key_falls_back_to_round_robin() {
        let (configs, runtime) = backends(&[(1, None); 3]);
        let policy = ConsistentHash::new(&configs, "header:x-job-id".parse().unwrap(), None);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let picks: Vec<usize> =
            (0..3).map(|_| policy.pick(&runtime, &request(&headers, &uri)).unwrap().index).collect();
        assert_eq!(picks, vec![0, 1, 2]);
    }
}
