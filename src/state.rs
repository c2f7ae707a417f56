//! The runtime snapshot: everything compiled from one config, swapped as a whole.
//!
//! The request path loads the [`Snapshot`] once per request from a single
//! `ArcSwap` and uses only that snapshot until the request ends, so it never sees
//! routes of one config and upstreams of another. [`Snapshot::compile`] carries
//! each backend's learned state forward from the previous snapshot by
//! (upstream name, address), so a reload that keeps a backend keeps what the proxy
//! knows about it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendState};
use crate::balance::Balancer;
use crate::cluster::Cluster;
use crate::config::AddressRules;
use crate::config::{
    ActiveCheck, BackendConfig, ClusterConfig, ConcurrencyScope, Config, Limits, Secret, UpstreamConfig,
};
use crate::health::CheckStatus;
use crate::metrics::series::RequestCounts;
use crate::queue::WaitQueue;
use crate::ratelimit::RateLimit;
use crate::retry::RetryBudget;
use crate::route::{Route, RoutePolicy, Router};
use crate::trace::Tracing;
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
    /// The Redis link of `cluster:`, kept across reloads that do not change it.
    pub cluster: Option<Arc<Cluster>>,
    /// `tracing:`, with its exporter kept across reloads that keep its
    /// collector and service name.
    pub tracing: Option<Tracing>,
    /// The `allow` / `deny` of each listener that has them, by configured
    /// bind (a reload matches listeners by bind: a name can change under a
    /// running one), with the listener's name.
    pub listener_access: HashMap<SocketAddr, (Arc<str>, AddressRules)>,
}

impl Snapshot {
    /// Marks every backend of `self` that `next` does not keep as retired,
    /// and links each upstream `next` rebuilt to its successor; call once
    /// `next` is live. Requests still on `self` finish what they started
    /// there but start nothing new on a removed backend; one that finds its
    /// upstream's backends retired goes on with the successor.
    pub fn retire_removed(&self, next: &Snapshot) {
        for upstream in &self.upstreams {
            let successor = next.upstreams.iter().find(|u| u.name == upstream.name && !Arc::ptr_eq(u, upstream));
            if let Some(successor) = successor {
                let _ = upstream.replaced_by.set(Arc::clone(successor));
            }
        }
        let kept: std::collections::HashSet<*const BackendState> =
            next.upstreams.iter().flat_map(|u| u.backends.iter().map(|b| Arc::as_ptr(&b.state))).collect();
        for backend in self.upstreams.iter().flat_map(|u| u.backends.iter()) {
            if !kept.contains(&Arc::as_ptr(&backend.state)) {
                backend.state.retire();
            }
        }
    }

    /// Compiles `config` whose upstreams all list their backends, or whose
    /// discovered upstreams have found none yet.
    pub fn compile(config: &Config, previous: Option<&Snapshot>, generation: u64) -> Snapshot {
        Snapshot::compile_discovered(config, &Discovered::new(), previous, generation)
    }

    /// Compiles `config` with each discovered upstream's backends taken from
    /// `discovered` (none when it has no entry): the one path by which a
    /// reload and a changed DNS answer both reach the request path, so a
    /// backend that stays keeps its state either way.
    pub fn compile_discovered(
        config: &Config,
        discovered: &Discovered,
        previous: Option<&Snapshot>,
        generation: u64,
    ) -> Snapshot {
        let carried = Carried::from(previous);
        let cluster = carried.cluster(config.cluster.as_ref());
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| compile_upstream(&with_discovered(u, discovered), &carried, cluster.as_ref()))
            .collect();
        let by_name: HashMap<&str, &Arc<Upstream>> = upstreams.iter().map(|u| (&*u.name, u)).collect();
        let routes = config
            .routes
            .iter()
            .map(|r| compile_route(r, by_name[r.upstream.as_str()], &carried, cluster.as_ref()))
            .collect();
        forget_other_routes_counts(&upstreams, config);
        Snapshot {
            generation,
            tls: listener_tls(config, previous),
            router: Router::new(routes),
            upstreams,
            limits: config.limits,
            access_log: config.log.access,
            admin_token: config.admin.token.clone(),
            config: Arc::new(config.clone()),
            cluster,
            tracing: config.tracing.as_ref().map(|c| Tracing::compile(c, previous.and_then(|p| p.tracing.as_ref()))),
            listener_access: config
                .listeners
                .iter()
                .filter(|l| !l.access.is_empty())
                .map(|l| (l.bind, (Arc::from(l.name.as_str()), l.access.clone())))
                .collect(),
        }
    }
}

/// One upstream of the next snapshot: the previous one whole if its config
/// did not change (balancer tables included, so a reload costs what it
/// changes), else built anew with every kept backend's state carried.
fn compile_upstream(u: &UpstreamConfig, carried: &Carried<'_>, cluster: Option<&Arc<Cluster>>) -> Arc<Upstream> {
    if let Some(previous) = carried.unchanged_upstream(u, cluster) {
        return previous;
    }
    let queue = u.queue.as_ref().map(|_| carried.queue(&u.name));
    let balancer = Balancer::new(&u.policy, &u.backends);
    let load = balancer.upstream_load();
    let backends: Vec<Arc<Backend>> = u
        .backends
        .iter()
        .map(|b| {
            let state = carried.backend_state(&u.name, &b.address);
            let check = u
                .health
                .active
                .as_ref()
                .map(|check| carried.check_status(&b.address, check, u.tls.as_ref().map(|t| t.fingerprint)));
            let address: Arc<str> = b.address.as_str().into();
            let pool_key = crate::backend::pool_key(&address, u.tls.as_ref());
            Arc::new(Backend {
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
    let slots = cluster.filter(|_| u.max_concurrency_scope == ConcurrencyScope::Cluster).map(|c| {
        let addresses: Vec<&str> = backends.iter().map(|b| &*b.address).collect();
        c.upstream(&u.name, &addresses, queue.as_ref())
    });
    Arc::new(Upstream {
        name: u.name.as_str().into(),
        backends,
        balancer,
        protocol: u.protocol,
        config: u.clone(),
        ejection_lock: Default::default(),
        queue,
        cluster: slots,
        replaced_by: OnceLock::new(),
    })
}

/// One route of the next snapshot, over its compiled `upstream`, with its
/// request counts and retry budget carried.
fn compile_route(
    r: &crate::config::RouteConfig,
    upstream: &Arc<Upstream>,
    carried: &Carried<'_>,
    cluster: Option<&Arc<Cluster>>,
) -> Route {
    let name: Arc<str> = r.name.as_str().into();
    Route {
        requests: upstream.backends.iter().map(|b| b.state.series.requests_of(&name)).collect(),
        requests_without_backend: carried.unsent_requests(&name, &upstream.name),
        duration: crate::metrics::request_duration(&name, &upstream.name),
        body_bytes: crate::metrics::body_bytes(&name, &upstream.name),
        host: r.matcher.host.clone(),
        path_prefix: r.matcher.path_prefix.clone(),
        methods: r.matcher.methods.clone(),
        headers: r.matcher.headers.clone(),
        upstream: Arc::clone(upstream),
        timeout: r.timeout,
        retry: r.retry.clone().map(|config| RoutePolicy { budget: carried.retry_budget(&r.name), config }),
        access: r.access.clone(),
        rate_limit: r.rate_limit.as_ref().map(|config| carried.rate_limit(&r.name, config, cluster)),
        auth: (!r.auth.is_empty()).then(|| {
            let rate_claim = r.rate_limit.as_ref().and_then(|limit| match &limit.key {
                crate::config::RateLimitKey::Claim(claim) => Some(claim.as_str()),
                crate::config::RateLimitKey::Request(_) => None,
            });
            crate::auth::RouteAuth::new(&r.auth, |source| carried.jwks(source), rate_claim)
        }),
        name,
    }
}

/// A backend forgets the request counts of routes that no longer send to
/// it, so they leave `/metrics` as a removed backend's series do.
fn forget_other_routes_counts(upstreams: &[Arc<Upstream>], config: &Config) {
    for upstream in upstreams {
        let routes: Vec<&str> =
            config.routes.iter().filter(|r| r.upstream == *upstream.name).map(|r| r.name.as_str()).collect();
        for backend in &upstream.backends {
            backend.state.series.keep_routes(|route| routes.contains(&route));
        }
    }
}

/// Each TLS listener's server config, by configured bind. An unchanged
/// listener keeps its acceptor, and with it the session cache and ticket
/// keys its clients resume with.
fn listener_tls(config: &Config, previous: Option<&Snapshot>) -> HashMap<SocketAddr, Arc<rustls::ServerConfig>> {
    config
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
        .collect()
}

/// The backends discovery found last, by upstream name.
pub type Discovered = HashMap<String, Vec<BackendConfig>>;

/// `upstream` with its discovered backends in place of its (empty) list.
fn with_discovered<'a>(upstream: &'a UpstreamConfig, discovered: &Discovered) -> Cow<'a, UpstreamConfig> {
    if upstream.discovery.is_none() {
        return Cow::Borrowed(upstream);
    }
    let backends = discovered.get(&upstream.name).cloned().unwrap_or_default();
    Cow::Owned(UpstreamConfig { backends, ..upstream.clone() })
}

/// An active check's identity: address, check, and the upstream's TLS
/// fingerprint (the same address checked with TLS and without is two checks).
type CheckKey = (String, ActiveCheck, Option<u64>);

/// What a new snapshot takes over from the one before it, by name: each kept
/// backend's learned state (by upstream and address), each active check's
/// status (by address, check and TLS setting, shared by every upstream that
/// checks an address the same way), each upstream's wait queue, each route's
/// retry budget, and whole upstreams whose config did not change. What is not
/// found starts fresh.
struct Carried<'a> {
    /// True for the first snapshot: its backends start as if always there (no
    /// slow start), where a backend a reload adds starts its slow start.
    first_generation: bool,
    backends: HashMap<(&'a str, &'a str), &'a Arc<BackendState>>,
    checks: std::cell::RefCell<HashMap<CheckKey, Arc<CheckStatus>>>,
    queues: HashMap<&'a str, &'a Arc<WaitQueue>>,
    budgets: HashMap<&'a str, &'a Arc<RetryBudget>>,
    rate_limits: HashMap<&'a str, &'a Arc<RateLimit>>,
    /// Fetched JWKS key sets, by URL.
    jwks: HashMap<&'a str, &'a Arc<crate::auth::Jwks>>,
    cluster: Option<&'a Arc<Cluster>>,
    /// Each route's requests that reached no backend, by (route, upstream).
    unsent: HashMap<(&'a str, &'a str), &'a Arc<RequestCounts>>,
    upstreams: HashMap<&'a str, &'a Arc<Upstream>>,
}

impl<'a> Carried<'a> {
    fn from(previous: Option<&'a Snapshot>) -> Self {
        let upstreams = previous.map_or(&[][..], |p| &p.upstreams[..]);
        let mut carried = Carried {
            first_generation: previous.is_none(),
            backends: HashMap::new(),
            checks: Default::default(),
            queues: HashMap::new(),
            budgets: HashMap::new(),
            rate_limits: HashMap::new(),
            jwks: HashMap::new(),
            cluster: previous.and_then(|p| p.cluster.as_ref()),
            unsent: HashMap::new(),
            upstreams: upstreams.iter().map(|u| (&*u.name, u)).collect(),
        };
        for upstream in upstreams {
            let check = upstream.config.health.active.as_ref();
            let tls = upstream.config.tls.as_ref().map(|t| t.fingerprint);
            for backend in &upstream.backends {
                carried.backends.insert((&upstream.name, &backend.address), &backend.state);
                if let (Some(check), Some(status)) = (check, &backend.check) {
                    carried
                        .checks
                        .get_mut()
                        .insert((backend.address.to_string(), check.clone(), tls), Arc::clone(status));
                }
            }
            if let Some(queue) = &upstream.queue {
                carried.queues.insert(&upstream.name, queue);
            }
        }
        for route in previous.map_or(&[][..], |p| p.router.routes()) {
            if let Some(retry) = &route.retry {
                carried.budgets.insert(&route.name, &retry.budget);
            }
            if let Some(limit) = &route.rate_limit {
                carried.rate_limits.insert(&route.name, limit);
            }
            if let Some(keys) = route.auth.as_ref().and_then(|auth| auth.jwt.as_ref()).map(|jwt| jwt.keys()) {
                if let crate::config::auth::JwksSource::Url { url, .. } = keys.source() {
                    carried.jwks.insert(url, keys);
                }
            }
            carried.unsent.insert((&route.name, &route.upstream.name), &route.requests_without_backend);
        }
        carried
    }

    fn unsent_requests(&self, route: &str, upstream: &str) -> Arc<RequestCounts> {
        self.unsent.get(&(route, upstream)).map(|c| Arc::clone(c)).unwrap_or_default()
    }

    /// The previous snapshot's upstream of this name if its config is the
    /// same: reused whole (balancer tables included), so a reload costs what it
    /// changes.
    fn unchanged_upstream(
        &self,
        config: &crate::config::UpstreamConfig,
        cluster: Option<&Arc<Cluster>>,
    ) -> Option<Arc<Upstream>> {
        let same_cluster = |u: &Upstream| match (&u.cluster, cluster) {
            (Some(slots), Some(cluster)) => Arc::ptr_eq(&slots.cluster, cluster),
            (None, _) => config.max_concurrency_scope != ConcurrencyScope::Cluster || cluster.is_none(),
            (Some(_), None) => false,
        };
        self.upstreams
            .get(config.name.as_str())
            .filter(|u| u.config == *config && same_cluster(u))
            .map(|u| Arc::clone(u))
    }

    /// The previous snapshot's Redis link if `cluster:` did not change, else
    /// a new one (none outside a runtime: a config only being checked).
    fn cluster(&self, config: Option<&ClusterConfig>) -> Option<Arc<Cluster>> {
        let config = config?;
        if let Some(previous) = self.cluster.filter(|c| c.config() == config) {
            return Some(Arc::clone(previous));
        }
        tokio::runtime::Handle::try_current().ok()?;
        match Cluster::start(config) {
            Ok(cluster) => Some(cluster),
            Err(error) => {
                tracing::error!(%error, "cannot use the cluster's Redis; cluster-scoped upstreams count per replica");
                None
            }
        }
    }

    fn backend_state(&self, upstream: &str, address: &str) -> Arc<BackendState> {
        match self.backends.get(&(upstream, address)) {
            Some(state) => Arc::clone(state),
            None if self.first_generation => Arc::default(),
            None => Arc::new(BackendState::added_now()),
        }
    }

    fn check_status(&self, address: &str, check: &ActiveCheck, tls: Option<u64>) -> Arc<CheckStatus> {
        let mut checks = self.checks.borrow_mut();
        Arc::clone(checks.entry((address.to_owned(), check.clone(), tls)).or_default())
    }

    fn queue(&self, upstream: &str) -> Arc<WaitQueue> {
        self.queues.get(upstream).map(|q| Arc::clone(q)).unwrap_or_default()
    }

    /// The route's buckets of the previous snapshot if its limit is the same,
    /// else new ones.
    fn rate_limit(
        &self,
        route: &str,
        config: &crate::config::RateLimitConfig,
        cluster: Option<&Arc<Cluster>>,
    ) -> Arc<RateLimit> {
        match self.rate_limits.get(route).filter(|limit| limit.config == *config && limit.shares_through(cluster)) {
            Some(limit) => Arc::clone(limit),
            None => Arc::new(RateLimit::new(config, route, cluster)),
        }
    }

    /// A route's key set: a URL's as the previous snapshot fetched it (when
    /// its settings are the same), so a reload neither refetches it nor
    /// refuses tokens meanwhile.
    fn jwks(&self, source: &crate::config::auth::JwksSource) -> Arc<crate::auth::Jwks> {
        let previous = match source {
            crate::config::auth::JwksSource::Url { url, .. } => self.jwks.get(url.as_str()).copied(),
            crate::config::auth::JwksSource::File { .. } => None,
        };
        crate::auth::Jwks::for_source(source, previous)
    }

    fn retry_budget(&self, route: &str) -> Arc<RetryBudget> {
        self.budgets.get(route).map(|b| Arc::clone(b)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn compile(yaml: &str, previous: Option<&Snapshot>) -> Snapshot {
        let config = crate::config::parse(yaml, "test.yaml").expect("a valid config");
        Snapshot::compile(&config, previous, previous.map_or(1, |p| p.generation + 1))
    }

    fn config(backends: &[&str], weight: u32) -> String {
        let list: Vec<String> = backends.iter().map(|b| format!("{{ address: \"{b}\", weight: {weight} }}")).collect();
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots, retry: {{ attempts: 2 }} }}]\n\
             upstreams:\n  bots:\n    health: {{ active: {{ kind: http, path: /health }} }}\n    queue: {{ max_waiting: 10 }}\n    \
             backends: [{}]\n",
            list.join(", ")
        )
    }

    fn backend<'a>(snapshot: &'a Snapshot, address: &str) -> Option<&'a Arc<Backend>> {
        snapshot.upstreams[0].backends.iter().find(|b| &*b.address == address)
    }

    #[test]
    fn a_kept_backend_keeps_its_state_a_removed_one_is_retired_an_added_one_starts_fresh() {
        let first = compile(&config(&["10.0.0.1:80", "10.0.0.2:80"], 1), None);
        let kept = Arc::clone(&backend(&first, "10.0.0.1:80").unwrap().state);
        let removed = Arc::clone(&backend(&first, "10.0.0.2:80").unwrap().state);
        let kept_check = Arc::clone(backend(&first, "10.0.0.1:80").unwrap().check.as_ref().unwrap());
        assert!(!kept.is_retired() && kept.added_at == 0, "the first snapshot's backends start as if always there");

        // A weight change rebuilds the upstream: the carry-forward is what keeps state.
        let second = compile(&config(&["10.0.0.1:80", "10.0.0.3:80"], 2), Some(&first));
        first.retire_removed(&second);
        let still = backend(&second, "10.0.0.1:80").unwrap();
        assert!(Arc::ptr_eq(&still.state, &kept), "same upstream and address: the same state object");
        assert!(Arc::ptr_eq(still.check.as_ref().unwrap(), &kept_check), "and the same check status");
        assert!(backend(&second, "10.0.0.2:80").is_none());
        assert!(removed.is_retired(), "a removed backend is retired: nothing new starts on it");
        assert!(!kept.is_retired());
        let added = backend(&second, "10.0.0.3:80").unwrap();
        assert!(!Arc::ptr_eq(&added.state, &kept) && !Arc::ptr_eq(&added.state, &removed));
        assert!(added.state.added_at != 0, "a backend a reload adds starts fresh, in slow start");

        let (first_upstream, second_upstream) = (&first.upstreams[0], &second.upstreams[0]);
        assert!(!Arc::ptr_eq(first_upstream, second_upstream), "a changed upstream is rebuilt");
        assert!(Arc::ptr_eq(first_upstream.queue.as_ref().unwrap(), second_upstream.queue.as_ref().unwrap()));
        let budget = |s: &Snapshot| Arc::clone(&s.router.routes()[0].retry.as_ref().unwrap().budget);
        assert!(Arc::ptr_eq(&budget(&first), &budget(&second)), "the route's retry budget is carried");

        // Unchanged config: the upstream is reused whole.
        let third = compile(&config(&["10.0.0.1:80", "10.0.0.3:80"], 2), Some(&second));
        assert!(Arc::ptr_eq(&second.upstreams[0], &third.upstreams[0]));
    }

    #[test]
    fn a_rebuilt_upstream_leads_to_its_newest_successor_an_unchanged_one_to_none() {
        let first = compile(&config(&["10.0.0.1:80"], 1), None);
        let second = compile(&config(&["10.0.0.2:80"], 1), Some(&first));
        assert!(first.upstreams[0].replacement().is_none(), "no successor before the reload is live");
        first.retire_removed(&second);
        let third = compile(&config(&["10.0.0.2:80"], 1), Some(&second));
        second.retire_removed(&third);
        assert!(second.upstreams[0].replacement().is_none(), "unchanged (reused whole): still live, no successor");
        let fourth = compile(&config(&["10.0.0.3:80"], 1), Some(&third));
        third.retire_removed(&fourth);
        let newest = first.upstreams[0].replacement().expect("rebuilt twice since");
        assert!(Arc::ptr_eq(&newest, &fourth.upstreams[0]), "followed to the newest, past the one in between");
        assert!(fourth.upstreams[0].replacement().is_none());
    }

    // ---- time-driven state on paused time --------------------------------------
    // `clock` reads tokio's clock in unit tests, so `tokio::time::advance` moves
    // backend state's time with the timers: exact, and no test waits for real.

    fn upstream_yaml(upstream_extra: &str, backends: &[&str]) -> String {
        let list: Vec<String> = backends.iter().map(|b| format!("{{ address: \"{b}\" }}")).collect();
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\n\
             upstreams:\n  bots:\n    {upstream_extra}\n    backends: [{}]\n",
            list.join(", ")
        )
    }

    async fn advance(by: std::time::Duration) {
        tokio::time::advance(by).await;
    }

    #[tokio::test(start_paused = true)]
    async fn passive_ejection_lasts_its_time_then_backs_off_on_paused_time() {
        let yaml = upstream_yaml(
            "health: { passive: { consecutive_failures: 2, ejection_time: 10s, max_ejection_percent: 50 } }",
            &["10.0.0.1:80", "10.0.0.2:80"],
        );
        let snapshot = compile(&yaml, None);
        let upstream = &snapshot.upstreams[0];
        let bot = &upstream.backends[0];
        assert_eq!(upstream.record_outcome(0, true), None, "one failure is not enough");
        assert_eq!(upstream.record_outcome(0, true), Some(Duration::from_secs(10)));
        assert!(!bot.is_healthy_now());
        advance(Duration::from_millis(9_990)).await;
        assert!(!bot.is_healthy_now(), "still out just before ejection_time");
        advance(Duration::from_millis(20)).await;
        assert!(bot.is_healthy_now(), "back once ejection_time has passed");
        upstream.record_outcome(0, true);
        assert_eq!(upstream.record_outcome(0, true), Some(Duration::from_secs(20)), "soon again: twice as long");
        // Only one of two backends may be out (50%).
        upstream.record_outcome(1, true);
        assert_eq!(upstream.record_outcome(1, true), None, "max_ejection_percent holds the second one in");
        advance(Duration::from_secs(20) + Duration::from_secs(101)).await;
        upstream.record_outcome(0, true);
        assert_eq!(upstream.record_outcome(0, true), Some(Duration::from_secs(10)), "a quiet 10x resets the back-off");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_backend_added_by_a_reload_on_paused_time() {
        let first = compile(&upstream_yaml("health: { slow_start: 10s }", &["10.0.0.1:80"]), None);
        advance(Duration::from_secs(60)).await;
        let second =
            compile(&upstream_yaml("health: { slow_start: 10s }", &["10.0.0.1:80", "10.0.0.2:80"]), Some(&first));
        let (old, new) = (&second.upstreams[0].backends[0], &second.upstreams[0].backends[1]);
        let now = crate::clock::nanos_since_epoch;
        assert_eq!(old.ramp(now()), 1.0, "a kept backend is not ramped again");
        assert!((new.ramp(now()) - crate::health::SLOW_START_FLOOR).abs() < 1e-9, "starts at the floor");
        advance(Duration::from_secs(5)).await;
        assert!((new.ramp(now()) - 0.5).abs() < 0.01, "halfway through the window: {}", new.ramp(now()));
        advance(Duration::from_secs(5)).await;
        assert_eq!(new.ramp(now()), 1.0, "the whole weight once the window is over");
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_refuses_for_open_for_then_lets_probes_through_on_paused_time() {
        let yaml = upstream_yaml(
            "circuit_breaker: { consecutive_failures: 3, open_for: 10s, half_open_requests: 1 }",
            &["10.0.0.1:80"],
        );
        let snapshot = compile(&yaml, None);
        let upstream = &snapshot.upstreams[0];
        let bot = &upstream.backends[0];
        for _ in 0..3 {
            let slot = bot.try_acquire(u32::MAX).expect("closed: admitted");
            upstream.outcome(0).report(true);
            drop(slot);
        }
        assert!(bot.try_acquire(u32::MAX).is_none(), "open: refused");
        advance(Duration::from_millis(9_990)).await;
        assert!(bot.try_acquire(u32::MAX).is_none(), "still open just before open_for");
        advance(Duration::from_millis(20)).await;
        let probe = bot.try_acquire(u32::MAX).expect("half-open: one probe");
        assert!(bot.try_acquire(u32::MAX).is_none(), "only half_open_requests probes at once");
        upstream.outcome(0).report(false);
        drop(probe);
        assert!(bot.try_acquire(u32::MAX).is_some(), "a successful probe closes the circuit");
    }

    #[tokio::test(start_paused = true)]
    async fn the_breakers_failure_rate_counts_only_its_window_on_paused_time() {
        let yaml = upstream_yaml(
            "circuit_breaker: { consecutive_failures: 100, failure_rate: 0.5, min_requests: 4, window: 10s }",
            &["10.0.0.1:80"],
        );
        let snapshot = compile(&yaml, None);
        let upstream = &snapshot.upstreams[0];
        let open = || !upstream.backends[0].circuit_allows(crate::clock::nanos_since_epoch());
        upstream.outcome(0).report(true);
        upstream.outcome(0).report(true);
        assert!(!open(), "two requests are fewer than min_requests");
        advance(Duration::from_secs(11)).await;
        for failed in [false, false, true] {
            upstream.outcome(0).report(failed);
        }
        assert!(!open(), "the first two failures left the window: 1 of 3 failed");
        upstream.outcome(0).report(true);
        assert!(open(), "2 of 4 in the window failed: the rate is reached");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_slides_with_its_window_on_paused_time() {
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.record_request();
        }
        // 10% of 100 requests plus 1 per second over the 10 s window.
        let withdrawn = (0..100).take_while(|_| budget.try_withdraw(0.1, 1)).count();
        assert_eq!(withdrawn, 20);
        advance(Duration::from_secs(5)).await;
        assert!(!budget.try_withdraw(0.1, 1), "the same window: spent");
        advance(Duration::from_secs(6)).await;
        let withdrawn = (0..100).take_while(|_| budget.try_withdraw(0.1, 1)).count();
        assert_eq!(withdrawn, 10, "the requests and retries left the window: the floor remains");
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_waits_exactly_the_queue_timeout_or_its_deadline_on_paused_time() {
        let queue = WaitQueue::default();
        let started = tokio::time::Instant::now();
        let far = started + Duration::from_secs(3600);
        let (ended, waited) = queue
            .pick_or_wait(
                crate::queue::Priority::Normal,
                10,
                Duration::from_secs(30),
                far,
                || std::future::ready(None::<()>),
                || true,
            )
            .await;
        assert_eq!(ended, Err(crate::queue::WaitEnded::Timeout));
        assert_eq!(waited, Some(Duration::from_secs(30)));
        assert_eq!(started.elapsed(), Duration::from_secs(30));

        let near = tokio::time::Instant::now() + Duration::from_secs(5);
        let (ended, waited) = queue
            .pick_or_wait(
                crate::queue::Priority::Normal,
                10,
                Duration::from_secs(30),
                near,
                || std::future::ready(None::<()>),
                || true,
            )
            .await;
        assert_eq!(ended, Err(crate::queue::WaitEnded::Deadline), "the route's deadline came first");
        assert_eq!(waited, Some(Duration::from_secs(5)));

        let (ended, waited) = queue
            .pick_or_wait(
                crate::queue::Priority::Normal,
                10,
                Duration::from_secs(30),
                far,
                || std::future::ready(None::<()>),
                || false,
            )
            .await;
        assert_eq!((ended, waited), (Err(crate::queue::WaitEnded::Unavailable), None), "not busy: no wait at all");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_estimates_decay_on_paused_time() {
        let snapshot = compile(&upstream_yaml("", &["10.0.0.1:80"]), None);
        let latency = &snapshot.upstreams[0].backends[0].state.latency;
        latency.observe(Duration::from_millis(400));
        let peak = latency.estimate().unwrap();
        assert_eq!(peak, 400e6, "a peak replaces the estimate at once");
        advance(Duration::from_secs(10)).await;
        let later = latency.estimate().unwrap();
        assert!((later / peak - (-1.0f64).exp()).abs() < 1e-6, "decays by 1/e over 10 s: {peak} then {later}");
    }
}
