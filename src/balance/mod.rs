//! Load-balancing policies: which backend of an upstream serves a request.
//!
//! A policy is *built* from the upstream's backend list when a config is compiled
//! (precomputing sequences, rings and prefix sums there, not per request), then
//! *walked* for each request ([`Policy::walk`]): it offers candidates in its
//! order until one is taken (Pingora's selector shape). A pick is the first
//! candidate not yet tried that admits the request, and a pick is also a
//! reservation: the returned [`Pick`] holds an in-flight slot, taken with a
//! compare-and-swap, so a backend at `max_concurrency` is never chosen by any
//! policy, even under races. `/explain` walks the same candidates without
//! reserving or moving the policy's state ([`Balancer::peek`]), and both judge
//! a backend by `Backend::ineligible`. One file per policy; [`Balancer`]
//! dispatches by enum so the set is closed and matches are checked for
//! exhaustiveness.

mod consistent_hash;
mod key;
mod least_loaded;
mod random;
mod round_robin;

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::{Backend, InFlightGuard};
use crate::config::{BackendConfig, PolicyConfig};

pub use consistent_hash::ConsistentHash;
pub use key::extract_key;
pub use least_loaded::LeastLoaded;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;

/// The parts of a request a policy may look at.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    pub headers: &'a http::HeaderMap,
    pub uri: &'a http::Uri,
    pub client_ip: IpAddr,
    /// Backends this request already tried (retries go elsewhere if they can).
    pub exclude: &'a [usize],
}

/// A chosen backend with its reserved in-flight slot.
#[derive(Debug)]
pub struct Pick {
    pub index: usize,
    pub guard: InFlightGuard,
}

/// One backend as a policy offers it for a request.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub index: usize,
    /// The policy's own bound on its in-flight count (bounded load), below
    /// `max_concurrency`'s.
    pub cap: u32,
    /// Whether slow start may pass this turn on: a backend at a fraction of its
    /// ramp takes a preferred turn with that probability, which scales its share
    /// for every policy. Fallback candidates are not thinned: a ramping backend
    /// is better than none.
    pub ramped: bool,
}

pub trait Policy {
    /// Offers candidates for `request` in this policy's order until `take`
    /// returns something, and returns that. `advance`: a real pick, which moves
    /// the policy's state (round robin's cursor); `/explain`'s look does not.
    fn walk<T>(
        &self,
        backends: &[Arc<Backend>],
        request: &PickRequest<'_>,
        advance: bool,
        take: impl FnMut(Candidate) -> Option<T>,
    ) -> Option<T>;

    /// Picks and reserves the first candidate not yet tried that admits the
    /// request, or `None` when every backend is out or at its limit.
    fn pick(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<Pick> {
        self.walk(backends, request, true, |candidate| admit(backends, request.exclude, candidate))
    }
}

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastLoaded(LeastLoaded),
    ConsistentHash(ConsistentHash),
    Random(WeightedRandom),
}

impl Balancer {
    pub fn new(policy: &PolicyConfig, backends: &[BackendConfig]) -> Self {
        match policy {
            PolicyConfig::RoundRobin => Balancer::RoundRobin(RoundRobin::new(backends)),
            PolicyConfig::LeastLoaded => Balancer::LeastLoaded(LeastLoaded),
            PolicyConfig::Random => Balancer::Random(WeightedRandom::new(backends)),
            PolicyConfig::ConsistentHash { key, bounded_load } => {
                Balancer::ConsistentHash(ConsistentHash::new(backends, key.clone(), *bounded_load))
            }
        }
    }

    /// The backend a request like this would get now, without reserving it or
    /// moving any balancer state (for `/explain`): the same walk as a pick, with
    /// eligibility asked instead of a slot taken. `least_loaded` and `random`
    /// draw as a real request does, so their answer is one draw.
    pub fn peek(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<usize> {
        let now = crate::clock::nanos_since_epoch();
        let eligible = |candidate: Candidate| {
            let backend = &backends[candidate.index];
            (backend.ineligible(|| now).is_none() && backend.in_flight() < candidate.cap).then_some(candidate.index)
        };
        match self {
            Balancer::RoundRobin(policy) => policy.walk(backends, request, false, eligible),
            Balancer::LeastLoaded(policy) => policy.walk(backends, request, false, eligible),
            Balancer::ConsistentHash(policy) => policy.walk(backends, request, false, eligible),
            Balancer::Random(policy) => policy.walk(backends, request, false, eligible),
        }
    }

    /// The running in-flight total the upstream's backends must keep for this
    /// policy, if it needs one (`consistent_hash` with `bounded_load`).
    pub fn upstream_load(&self) -> Option<Arc<crate::backend::UpstreamLoad>> {
        match self {
            Balancer::ConsistentHash(policy) => policy.upstream_load().cloned(),
            _ => None,
        }
    }

    /// Up to `max` backends that could take `request` by what this process
    /// knows (eligible, under their limits here), in the policy's order and
    /// moving its state as a pick does, without reserving any: for a pick
    /// whose slots are counted elsewhere (a cluster-scoped upstream asks Redis
    /// for the first of them with room). Untried backends only, unless every
    /// candidate was tried. Slow start does not thin this list.
    pub fn candidates(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>, max: usize) -> Vec<usize> {
        let now = crate::clock::nanos_since_epoch();
        let walk = |exclude: &[usize]| {
            let mut found = Vec::with_capacity(max.min(backends.len()));
            let offer = |candidate: Candidate| {
                let backend = &backends[candidate.index];
                let usable = !exclude.contains(&candidate.index)
                    && !found.contains(&candidate.index)
                    && backend.ineligible(|| now).is_none()
                    && backend.in_flight() < candidate.cap;
                if usable {
                    found.push(candidate.index);
                }
                (found.len() >= max).then_some(())
            };
            match self {
                Balancer::RoundRobin(policy) => policy.walk(backends, request, true, offer),
                Balancer::LeastLoaded(policy) => policy.walk(backends, request, true, offer),
                Balancer::ConsistentHash(policy) => policy.walk(backends, request, true, offer),
                Balancer::Random(policy) => policy.walk(backends, request, true, offer),
            };
            found
        };
        let found = walk(request.exclude);
        if found.is_empty() && !request.exclude.is_empty() {
            return walk(&[]);
        }
        found
    }

    /// Picks and reserves a backend (see [`Policy::pick`]). A retry prefers the
    /// backends it has not tried; when none of those can take it, a tried one
    /// may (a second walk, on retries only).
    pub fn pick(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<Pick> {
        let pick = |request: &PickRequest<'_>| match self {
            Balancer::RoundRobin(policy) => policy.pick(backends, request),
            Balancer::LeastLoaded(policy) => policy.pick(backends, request),
            Balancer::ConsistentHash(policy) => policy.pick(backends, request),
            Balancer::Random(policy) => policy.pick(backends, request),
        };
        pick(request).or_else(|| {
            if request.exclude.is_empty() {
                None
            } else {
                pick(&PickRequest { exclude: &[], ..*request })
            }
        })
    }
}

/// Reserves `candidate` unless the request tried it already, slow start passes
/// its turn on, or it cannot take the request (`Backend::try_acquire`).
fn admit(backends: &[Arc<Backend>], tried: &[usize], candidate: Candidate) -> Option<Pick> {
    let Candidate { index, cap, ramped } = candidate;
    if tried.contains(&index) {
        return None;
    }
    let backend = &backends[index];
    if ramped && backend.slow_start.is_some() {
        let ramp = backend.ramp(crate::clock::nanos_since_epoch());
        if ramp < 1.0 && fastrand::f64() >= ramp {
            return None;
        }
    }
    backend.try_acquire(cap).map(|guard| Pick { index, guard })
}

/// The fallback every policy ends its walk with: each backend once, going
/// round from `start`, under `cap`, not thinned by slow start.
fn offer_all_from<T>(
    backends: &[Arc<Backend>],
    start: usize,
    cap: u32,
    mut take: impl FnMut(Candidate) -> Option<T>,
) -> Option<T> {
    let n = backends.len();
    (0..n).find_map(|step| take(Candidate { index: (start + step) % n, cap, ramped: false }))
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn backends(specs: &[(u32, Option<u32>)]) -> (Vec<BackendConfig>, Vec<Arc<Backend>>) {
        let configs: Vec<BackendConfig> = specs
            .iter()
            .enumerate()
            .map(|(i, &(weight, max_concurrency))| BackendConfig {
                address: format!("10.0.0.{}:80", i + 1),
                weight,
                max_concurrency,
            })
            .collect();
        let runtime = configs.iter().map(|c| Arc::new(Backend::detached(c))).collect();
        (configs, runtime)
    }

    pub fn request<'a>(headers: &'a http::HeaderMap, uri: &'a http::Uri) -> PickRequest<'a> {
        PickRequest { headers, uri, client_ip: IpAddr::from([127, 0, 0, 1]), exclude: &[] }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{backends, request};
    use super::*;

    fn key_headers(key: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-job-id", key.parse().unwrap());
        headers
    }

    #[test]
    fn peek_names_what_the_next_pick_takes_and_moves_nothing() {
        let (configs, runtime) = backends(&[(1, None), (2, None), (1, Some(1))]);
        let uri = http::Uri::from_static("/");
        for policy in [
            PolicyConfig::RoundRobin,
            PolicyConfig::ConsistentHash { key: "header:x-job-id".parse().unwrap(), bounded_load: Some(1.25) },
        ] {
            let balancer = Balancer::new(&policy, &configs);
            let mut held = Vec::new();
            for job in 0..40 {
                let headers = key_headers(&format!("job-{job}"));
                let named = balancer.peek(&runtime, &request(&headers, &uri));
                assert_eq!(named, balancer.peek(&runtime, &request(&headers, &uri)), "a peek moves nothing");
                let picked = balancer.pick(&runtime, &request(&headers, &uri)).map(|p| p.index);
                assert_eq!(named, picked, "{policy:?}, job {job}");
                // Keep the one-slot backend full half the time, so peeks must see it full.
                if job % 2 == 0 {
                    held.extend(balancer.pick(&runtime, &request(&headers, &uri)));
                } else {
                    held.clear();
                }
            }
        }
    }

    #[test]
    fn every_policy_over_no_backends_picks_none() {
        // A discovered upstream whose first lookup failed has no backends yet.
        let (headers, uri) = (key_headers("job-1"), http::Uri::from_static("/"));
        for policy in [
            PolicyConfig::RoundRobin,
            PolicyConfig::LeastLoaded,
            PolicyConfig::Random,
            PolicyConfig::ConsistentHash { key: "header:x-job-id".parse().unwrap(), bounded_load: Some(1.25) },
            PolicyConfig::ConsistentHash { key: "header:x-job-id".parse().unwrap(), bounded_load: None },
        ] {
            let balancer = Balancer::new(&policy, &[]);
            assert!(balancer.pick(&[], &request(&headers, &uri)).is_none(), "{policy:?}");
            assert!(balancer.peek(&[], &request(&headers, &uri)).is_none(), "{policy:?}");
        }
    }

    #[test]
    fn a_retry_goes_to_an_untried_backend_and_to_a_tried_one_only_when_no_other_can_take_it() {
        let (configs, runtime) = backends(&[(1, None), (1, None), (1, Some(1))]);
        let (headers, uri) = (http::HeaderMap::new(), http::Uri::from_static("/"));
        let balancer = Balancer::new(&PolicyConfig::RoundRobin, &configs);
        for _ in 0..20 {
            let retry = PickRequest { exclude: &[0, 1], ..request(&headers, &uri) };
            let pick = balancer.pick(&runtime, &retry).unwrap();
            assert_eq!(pick.index, 2, "the one backend not tried yet");
            // Backend 2 is now full: the retry goes back to a tried one rather than nowhere.
            let fallback = balancer.pick(&runtime, &retry).unwrap();
            assert!(fallback.index < 2);
        }
    }
}
