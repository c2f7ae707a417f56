//! The runtime snapshot: everything compiled from one config, swapped as a whole.
//!
//! The request path loads the [`Snapshot`] once per request from a single
//! `ArcSwap` and uses only that snapshot until the request ends, so it never sees
//! routes of one config and upstreams of another. [`Snapshot::compile`] carries
//! each backend's learned state forward from the previous snapshot by
//! (upstream name, address), so a reload that keeps a backend keeps what the proxy
//! knows about it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendState};
use crate::balance::Balancer;
use crate::config::{ActiveCheck, Config, Limits, Secret};
use crate::health::CheckStatus;
use crate::queue::WaitQueue;
use crate::retry::RetryBudget;
use crate::route::{Route, RoutePolicy, Router};
use crate::upstream::Upstream;

/// The live configuration, read lock-free by every request.
pub type Live = Arc<ArcSwap<Snapshot>>;

/// One worker's handle on the live config. The stack holds it and hyper clones
/// the stack for every request: cloning this outer `Arc` touches a count only
/// this worker uses, where cloning `Live` itself would bounce one count between
/// every worker's core on every request.
pub type WorkerLive = Arc<Live>;

/// A worker thread's own reference to the live snapshot. Requests clone this
/// outer `Arc`, whose count only their own thread touches, instead of the
/// snapshot's, which every worker would bounce between cores on every request.
pub type SnapshotShare = Arc<Arc<Snapshot>>;

thread_local! {
    /// This thread's share of the snapshot last seen live, with the `Live` it
    /// came from (tests run several proxies in one process).
    static SHARE: std::cell::RefCell<Option<(usize, SnapshotShare)>> = const { std::cell::RefCell::new(None) };
}

/// The live snapshot, as this thread's share of it (made anew after a reload).
pub fn current(live: &Live) -> SnapshotShare {
    let snapshot = live.load();
    let live_id = Arc::as_ptr(live) as usize;
    SHARE.with(|share| {
        let mut share = share.borrow_mut();
        if let Some((id, cached)) = share.as_ref() {
            if *id == live_id && Arc::ptr_eq(&**cached, &*snapshot) {
                return Arc::clone(cached);
            }
        }
        let fresh: SnapshotShare = Arc::new(arc_swap::Guard::into_inner(snapshot));
        *share = Some((live_id, Arc::clone(&fresh)));
        fresh
    })
}

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub router: Router,
    pub upstreams: Vec<Arc<Upstream>>,
    pub limits: Limits,
    pub access_log: bool,
    /// The admin token in force (the admin listener reads it per call).
    pub admin_token: Option<Secret>,
    /// The config this snapshot was compiled from, for `/config`.
    pub config: Arc<Config>,
    /// TLS for each listener that has it, by configured bind; a listener reads
    /// it at each accept, so a reload's certificates serve new connections.
    pub tls: HashMap<SocketAddr, Arc<rustls::ServerConfig>>,
}

impl Snapshot {
    /// Marks every backend of `self` that `next` does not keep as retired; call
    /// once `next` is live. Requests still on `self` finish what they started
    /// there but start nothing new on a removed backend.
    pub fn retire_removed(&self, next: &Snapshot) {
        let kept: std::collections::HashSet<*const BackendState> =
            next.upstreams.iter().flat_map(|u| u.backends.iter().map(|b| Arc::as_ptr(&b.state))).collect();
        for backend in self.upstreams.iter().flat_map(|u| u.backends.iter()) {
            if !kept.contains(&Arc::as_ptr(&backend.state)) {
                backend.state.retire();
            }
        }
    }

    pub fn compile(config: &Config, previous: Option<&Snapshot>, generation: u64) -> Snapshot {
        let previous_upstreams = previous.map_or(&[][..], |p| &p.upstreams[..]);
        let mut carried: HashMap<(&str, &str), &Arc<BackendState>> = HashMap::new();
        for upstream in previous_upstreams {
            for backend in &upstream.backends {
                carried.insert((&upstream.name, &backend.address), &backend.state);
            }
        }
        let unchanged: HashMap<&str, &Arc<Upstream>> = previous_upstreams.iter().map(|u| (&*u.name, u)).collect();
        // One check status per (address, check), shared by every upstream that
        // checks that address that way, and carried over from the last snapshot.
        // The upstream's TLS setting is part of the check: the same address
        // checked with TLS and without is two checks.
        let mut checks: HashMap<(&str, &ActiveCheck, Option<u64>), Arc<CheckStatus>> = HashMap::new();
        for upstream in previous_upstreams {
            if let Some(check) = &upstream.config.health.active {
                let tls = upstream.config.tls.as_ref().map(|t| t.fingerprint);
                for backend in &upstream.backends {
                    if let Some(status) = &backend.check {
                        checks.insert((&backend.address, check, tls), Arc::clone(status));
                    }
                }
            }
        }
        let first_generation = previous.is_none();
        let mut queues: HashMap<&str, Arc<WaitQueue>> = HashMap::new();
        for upstream in previous_upstreams {
            if let Some(queue) = &upstream.queue {
                queues.insert(&upstream.name, Arc::clone(queue));
            }
        }
        let mut budgets: HashMap<&str, Arc<RetryBudget>> = HashMap::new();
        for route in previous.map_or(&[][..], |p| p.router.routes()) {
            if let Some(retry) = &route.retry {
                budgets.insert(&route.name, Arc::clone(&retry.budget));
            }
        }
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                // An upstream whose config did not change is reused whole (balancer
                // tables included), so a reload costs what it changes.
                if let Some(previous) = unchanged.get(u.name.as_str()).filter(|p| p.config == *u) {
                    return Arc::clone(previous);
                }
                let queue = u.queue.as_ref().map(|_| queues.get(u.name.as_str()).cloned().unwrap_or_default());
                let upstream_name: Arc<str> = u.name.as_str().into();
                let balancer = Balancer::new(&u.policy, &u.backends);
                let load = balancer.upstream_load();
                let backends = u
                    .backends
                    .iter()
                    .map(|b| {
                        let state = match carried.get(&(u.name.as_str(), b.address.as_str())) {
                            Some(state) => Arc::clone(state),
                            None if first_generation => Arc::default(),
                            None => Arc::new(BackendState::added_now()),
                        };
                        let check = u.health.active.as_ref().map(|check| {
                            let tls = u.tls.as_ref().map(|t| t.fingerprint);
                            Arc::clone(checks.entry((b.address.as_str(), check, tls)).or_default())
                        });
                        let address: Arc<str> = b.address.as_str().into();
                        let pool_key = match &u.tls {
                            Some(tls) => format!("{address}#tls-{:016x}", tls.fingerprint).into(),
                            None => Arc::clone(&address),
                        };
                        Arc::new(Backend {
                            upstream_duration: crate::metrics::upstream_duration(&upstream_name, &address),
                            address,
                            pool_key,
                            authority: b.address.parse().expect("validated backend address"),
                            weight: b.weight,
                            max_concurrency: b.max_concurrency.unwrap_or(u32::MAX),
                            state,
                            check,
                            slow_start: u.health.slow_start,
                            breaker: u.circuit_breaker,
                            queue: queue.clone(),
                            load: load.clone(),
                        })
                    })
                    .collect();
                Arc::new(Upstream {
                    name: upstream_name,
                    backends,
                    balancer,
                    protocol: u.protocol,
                    config: u.clone(),
                    ejection_lock: Default::default(),
                    queue,
                })
            })
            .collect();
        let by_name: HashMap<&str, &Arc<Upstream>> = upstreams.iter().map(|u| (&*u.name, u)).collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let name: Arc<str> = r.name.as_str().into();
                let upstream = by_name[r.upstream.as_str()];
                Route {
                    requests: upstream
                        .backends
                        .iter()
                        .map(|b| crate::metrics::RequestCounters::new(&name, &upstream.name, Some(&b.address)))
                        .collect(),
                    requests_without_backend: crate::metrics::RequestCounters::new(&name, &upstream.name, None),
                    duration: crate::metrics::request_duration(&name, &upstream.name),
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    methods: r.methods.clone(),
                    headers: r.headers.clone(),
                    upstream: Arc::clone(upstream),
                    timeout: r.timeout,
                    retry: r.retry.clone().map(|config| RoutePolicy {
                        budget: budgets.get(r.name.as_str()).cloned().unwrap_or_default(),
                        config,
                    }),
                    name,
                }
            })
            .collect();
        // An unchanged listener keeps its acceptor, and with it the session
        // cache and ticket keys its clients resume with.
        let tls = config
            .listeners
            .iter()
            .filter_map(|listener| {
                let settings = listener.tls.as_ref()?;
                let kept = previous.and_then(|p| {
                    let before = p.config.listeners.iter().find(|l| l.bind == listener.bind)?;
                    (before.tls.as_ref() == Some(settings)).then(|| p.tls.get(&listener.bind).cloned())?
                });
                Some((listener.bind, kept.unwrap_or_else(|| crate::tls::server_config(settings))))
            })
            .collect();
        Snapshot {
            generation,
            tls,
            router: Router::new(routes),
            upstreams,
            limits: config.limits,
            access_log: config.log.access,
            admin_token: config.admin.token.clone(),
            config: Arc::new(config.clone()),
        }
    }
}
