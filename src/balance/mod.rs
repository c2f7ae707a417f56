//! Load-balancing policies: which backend of an upstream serves a request.
//!
//! A policy is *built* from the upstream's backend list when a config is compiled
//! (precomputing sequences, rings and prefix sums there, not per request), then
//! asked to [`Policy::pick`] for each request. A pick is also a reservation: the
//! returned [`Pick`] holds an in-flight slot, taken with a compare-and-swap, so a
//! backend at `max_concurrency` is never chosen by any policy, even under races.
//! One file per policy; [`Balancer`] dispatches by enum so the set is closed and
//! matches are checked for exhaustiveness.

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

pub trait Policy {
    /// Picks and reserves a backend among those available, or `None` when every
    /// backend is at its limit.
    fn pick(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<Pick>;
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
    /// moving any balancer state (for `/explain`). Exact for `consistent_hash`
    /// and `round_robin`; `least_loaded` names the cheapest backend (a real
    /// request compares two at random); `random` draws one.
    pub fn peek(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<usize> {
        let available = |index: usize| backends[index].is_available();
        match self {
            Balancer::RoundRobin(policy) => policy.peek(backends),
            Balancer::ConsistentHash(policy) => policy.peek(backends, request),
            Balancer::LeastLoaded(_) => least_loaded::cheapest(backends),
            Balancer::Random(_) => {
                let eligible: Vec<usize> = (0..backends.len()).filter(|&i| available(i)).collect();
                (!eligible.is_empty()).then(|| eligible[fastrand::usize(..eligible.len())])
            }
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

    pub fn pick(&self, backends: &[Arc<Backend>], request: &PickRequest<'_>) -> Option<Pick> {
        match self {
            Balancer::RoundRobin(policy) => policy.pick(backends, request),
            Balancer::LeastLoaded(policy) => policy.pick(backends, request),
            Balancer::ConsistentHash(policy) => policy.pick(backends, request),
            Balancer::Random(policy) => policy.pick(backends, request),
        }
    }
}

/// Reserves backend `index` if it is available and below `cap`. A backend in
/// slow start passes its turn with probability `1 - ramp`, which scales its
/// share by its ramp for every policy that picks by position.
fn acquire(backends: &[Arc<Backend>], request: &PickRequest<'_>, index: usize, cap: u32) -> Option<Pick> {
    let backend = &backends[index];
    if backend.slow_start.is_some() {
        let ramp = backend.ramp(crate::clock::nanos_since_epoch());
        if ramp < 1.0 && fastrand::f64() >= ramp {
            return None;
        }
    }
    acquire_unramped(backends, request, index, cap)
}

/// Reserves backend `index` if it is available and below `cap`, slow start aside.
fn acquire_unramped(backends: &[Arc<Backend>], request: &PickRequest<'_>, index: usize, cap: u32) -> Option<Pick> {
    if request.exclude.contains(&index) {
        return None;
    }
    backends[index].try_acquire(cap).map(|guard| Pick { index, guard })
}

/// The fallback of every policy when its preferred candidates are full: the first
/// backend, going round from `start`, that can take the request. Slow start does
/// not apply here: a ramping backend is better than none.
fn first_available_from(backends: &[Arc<Backend>], request: &PickRequest<'_>, start: usize) -> Option<Pick> {
    let n = backends.len();
    (0..n).find_map(|step| acquire_unramped(backends, request, (start + step) % n, u32::MAX))
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
