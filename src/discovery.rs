//! Backends from DNS. Each upstream with `discovery` has a lookup loop: the A
//! (else AAAA) records of a name, every address on the configured port, or the
//! SRV records of a name, with their targets, ports and weights. It asks again
//! after `refresh`, or when the answer's TTL runs out if that is later. A
//! changed set wakes the runtime, which compiles a snapshot with it by the
//! same path as a reload (`state::Snapshot::compile_discovered`), so a backend
//! that stays keeps what the proxy learned about it. A failed lookup (timeout,
//! SERVFAIL, NXDOMAIN, no records) keeps the last good set; it is counted and
//! shown in `/status` with its reason and time.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures_util::future::join_all;
use futures_util::StreamExt;
use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as DnsServers};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use xxhash_rust::xxh3::xxh3_64;

use crate::config::values::Weight;
use crate::config::{BackendConfig, Config, DiscoveryConfig, DiscoverySource, ResolverConfig};
use crate::state::Discovered;

/// A TTL longer than this is not waited out: an hour-old answer is refreshed
/// whatever the zone says.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Bound on each query to a configured server, and how many times it is
/// asked; a failed lookup is tried again at the next `refresh`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// The lookup loops of one proxy and what they found.
pub struct Discovery {
    resolver: Resolver,
    /// The proxy's own listener and admin binds, never taken as backends.
    own: Arc<[SocketAddr]>,
    watches: HashMap<String, Watch>,
    /// Woken when any upstream's set changes.
    changed: Arc<Notify>,
}

/// The resolver and the `resolver:` settings it was built from.
struct Resolver {
    settings: ResolverConfig,
    /// Why it could not be built (an unreadable `/etc/resolv.conf`), as every
    /// lookup's failure reason.
    built: Result<Arc<TokioResolver>, String>,
}

struct Watch {
    config: DiscoveryConfig,
    found: Arc<Found>,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one upstream's lookups found: written by its loop, read by the
/// runtime (the set) and `/status`.
#[derive(Default)]
struct Found {
    state: Mutex<FoundState>,
}

#[derive(Default, Clone)]
struct FoundState {
    /// The last good set, sorted by address; `None` until a lookup succeeds.
    backends: Option<Vec<BackendConfig>>,
    last_success: Option<(Instant, SystemTime)>,
    last_failure: Option<Failure>,
    consecutive_failures: u32,
    next_lookup: Option<Instant>,
    /// What the last successful lookup left out.
    dropped: Dropped,
}

#[derive(Clone)]
struct Failure {
    reason: String,
    at: (Instant, SystemTime),
}

impl Discovery {
    /// `changed` is woken whenever an upstream's set changes.
    pub fn new(settings: &ResolverConfig, changed: Arc<Notify>) -> Self {
        Discovery { resolver: Resolver::build(settings), own: Arc::from([]), watches: HashMap::new(), changed }
    }

    /// Makes the lookup loops exactly those `config` asks for. A new or changed
    /// discovery is looked up once before this returns (within the resolver's
    /// bounds), so the snapshot compiled next already has its backends; one
    /// whose source is unchanged keeps the set it found. A changed `resolver:`
    /// restarts every loop.
    pub async fn sync(&mut self, config: &Config) {
        let own: Vec<SocketAddr> =
            config.listeners.iter().map(|l| l.bind).chain([config.admin.bind]).filter(|b| b.port() != 0).collect();
        let own_changed = *own != *self.own;
        self.own = Arc::from(own);
        let resolver_changed = config.resolver != self.resolver.settings || own_changed;
        if resolver_changed {
            self.resolver = Resolver::build(&config.resolver);
        }
        let mut kept = HashMap::new();
        let mut started = Vec::new();
        for upstream in &config.upstreams {
            let Some(discovery) = &upstream.discovery else { continue };
            let previous = self.watches.remove(&upstream.name);
            match previous {
                Some(watch) if watch.config == *discovery && !resolver_changed => {
                    kept.insert(upstream.name.clone(), watch);
                }
                previous => {
                    // The same source asked differently (refresh, defaults): start from its set.
                    let found = Arc::new(Found::default());
                    if let Some(previous) = previous.filter(|w| w.config.source == discovery.source) {
                        found.state.lock().expect("never poisoned").backends = previous.found.set();
                    }
                    started.push((upstream.name.clone(), discovery.clone(), found));
                }
            }
        }
        // Dropping what is left stops the loops of upstreams no longer discovered.
        self.watches = kept;
        let first_lookups = started.iter().map(|(name, config, found)| {
            let (resolver, own) = (self.resolver.built.clone(), Arc::clone(&self.own));
            async move { found.look(&resolver, name, config, &own).await.0 }
        });
        let waits = join_all(first_lookups).await;
        for ((name, config, found), wait) in started.into_iter().zip(waits) {
            let task = tokio::spawn(follow(
                self.resolver.built.clone(),
                Arc::clone(&self.own),
                name.clone(),
                config.clone(),
                Arc::clone(&found),
                Arc::clone(&self.changed),
                wait,
            ));
            self.watches.insert(name, Watch { config, found, task });
        }
    }

    /// Stops every lookup loop (at shutdown).
    pub fn stop(&mut self) {
        self.watches.clear();
    }

    /// Each discovered upstream's last good set.
    pub fn discovered(&self) -> Discovered {
        self.watches.iter().filter_map(|(name, watch)| Some((name.clone(), watch.found.set()?))).collect()
    }

    /// What each discovered upstream's lookups found, for `/status`.
    pub fn status(&self) -> BTreeMap<String, DiscoveryStatus> {
        let now = (Instant::now(), SystemTime::now());
        self.watches.iter().map(|(name, watch)| (name.clone(), DiscoveryStatus::of(watch, now))).collect()
    }
}

impl Resolver {
    fn build(settings: &ResolverConfig) -> Resolver {
        let builder = if settings.servers.is_empty() {
            // The system's servers, search domains and options (Kubernetes' ndots among them).
            TokioResolver::builder_tokio().map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            let mut builder =
                TokioResolver::builder_with_config(DnsServers::from_name_servers(servers), TokioRuntimeProvider::new());
            builder.options_mut().timeout = QUERY_TIMEOUT;
            builder.options_mut().attempts = QUERY_ATTEMPTS;
            Ok(builder)
        };
        let built = builder.and_then(|mut builder| {
            // The loops keep their own time; a cache would only hide a change
            // (or a recovery after NXDOMAIN) until its own TTL ran out.
            builder.options_mut().cache_size = 0;
            // One address family per name, as a client of a Service expects:
            // IPv4 when there is any, else IPv6.
            builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
            builder.build().map(Arc::new).map_err(|e| format!("cannot start the DNS resolver: {e}"))
        });
        Resolver { settings: settings.clone(), built }
    }
}

/// An upstream's lookup loop: waits `wait`, looks up, and wakes the runtime
/// when the set changed.
async fn follow(
    resolver: Result<Arc<TokioResolver>, String>,
    own: Arc<[SocketAddr]>,
    upstream: String,
    config: DiscoveryConfig,
    found: Arc<Found>,
    changed: Arc<Notify>,
    mut wait: Duration,
) {
    loop {
        tokio::time::sleep(wait).await;
        let changed_set;
        (wait, changed_set) = found.look(&resolver, &upstream, &config, &own).await;
        if changed_set {
            changed.notify_one();
        }
    }
}

impl Found {
    fn set(&self) -> Option<Vec<BackendConfig>> {
        self.state.lock().expect("never poisoned").backends.clone()
    }

    /// One lookup: records its result and returns how long to wait for the
    /// next, and whether the set changed.
    async fn look(
        &self,
        resolver: &Result<Arc<TokioResolver>, String>,
        upstream: &str,
        config: &DiscoveryConfig,
        own: &[SocketAddr],
    ) -> (Duration, bool) {
        let result = match resolver {
            Ok(resolver) => lookup(resolver, config, own).await,
            Err(reason) => Err(reason.clone()),
        };
        crate::metrics::discovery_lookup(upstream, result.is_ok());
        let now = (Instant::now(), SystemTime::now());
        let mut state = self.state.lock().expect("never poisoned");
        let mut changed = false;
        let wait = match result {
            Ok(Answer { backends, valid_until, dropped }) => {
                if state.backends.as_ref() != Some(&backends) {
                    tracing::info!(upstream, source = %config.source, backends = backends.len(), "discovered backends changed");
                    changed = true;
                }
                for (reason, count) in dropped.counts().into_iter().filter(|(_, count)| *count > 0) {
                    crate::metrics::discovery_dropped(upstream, reason, count);
                }
                if dropped.any() && (changed || dropped != state.dropped) {
                    tracing::error!(upstream, source = %config.source, ?dropped, kept = backends.len(),
                        "discovery answer held records that are not used");
                }
                state.dropped = dropped;
                state.backends = Some(backends);
                state.last_success = Some(now);
                state.consecutive_failures = 0;
                valid_until.saturating_duration_since(now.0).clamp(config.refresh, MAX_WAIT.max(config.refresh))
            }
            Err(reason) => {
                tracing::warn!(upstream, source = %config.source, %reason, kept = state.backends.as_ref().map_or(0, Vec::len),
                    "discovery lookup failed; keeping the last good set");
                state.last_failure = Some(Failure { reason, at: now });
                state.consecutive_failures += 1;
                config.refresh
            }
        };
        state.next_lookup = Some(now.0 + wait);
        (wait, changed)
    }
}

/// What a lookup found: the backends `config` names now, sorted by address,
/// until when the answer is valid, and what it left out.
struct Answer {
    backends: Vec<BackendConfig>,
    valid_until: Instant,
    dropped: Dropped,
}

/// What a lookup's answer held that the set does not: whoever controls the
/// records must not control the proxy.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Beyond `max_backends` (a deterministic subset is kept).
    pub over_max_backends: usize,
    /// Unspecified, multicast, broadcast or link-local addresses, and port 0.
    pub unusable_addresses: usize,
    /// The proxy's own listener or admin addresses.
    pub own_addresses: usize,
    /// SRV targets without glue records that did not resolve in time.
    pub failed_targets: Vec<String>,
}

impl Dropped {
    fn any(&self) -> bool {
        *self != Dropped::default()
    }

    /// Each reason's count, by its metric label.
    fn counts(&self) -> [(&'static str, usize); 4] {
        [
            ("over_max_backends", self.over_max_backends),
            ("unusable_address", self.unusable_addresses),
            ("own_address", self.own_addresses),
            ("failed_target", self.failed_targets.len()),
        ]
    }
}

/// Bound on resolving all of an SRV answer's targets that came without glue.
const TARGETS_DEADLINE: Duration = Duration::from_secs(5);
/// Targets resolved at once.
const TARGETS_AT_ONCE: usize = 16;

/// The backends `config` names now. An empty answer is a failure: it would
/// take every backend away, which a DNS outage must not do.
async fn lookup(resolver: &TokioResolver, config: &DiscoveryConfig, own: &[SocketAddr]) -> Result<Answer, String> {
    let mut found: Vec<(SocketAddr, u32)>;
    let mut dropped = Dropped::default();
    let valid_until;
    match &config.source {
        DiscoverySource::Dns { name, port } => {
            let answer = resolver.lookup_ip(name.as_str()).await.map_err(|e| reason(&e))?;
            valid_until = Instant::from_std(answer.valid_until());
            found = answer.iter().map(|ip| (SocketAddr::new(ip, *port), config.defaults.weight)).collect();
        }
        DiscoverySource::Srv { name } => {
            let answer = resolver.srv_lookup(name.as_str()).await.map_err(|e| reason(&e))?;
            let mut until = Instant::from_std(answer.valid_until());
            let records: Vec<_> = answer
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) if !srv.target.is_root() => Some(srv),
                    _ => None,
                })
                .collect();
            // RFC 2782: use the lowest-numbered priority present.
            let priority = records.iter().map(|srv| srv.priority).min();
            let wanted: Vec<_> = records.into_iter().filter(|srv| Some(srv.priority) == priority).collect();
            let mut addresses: HashMap<Name, Vec<IpAddr>> = HashMap::new();
            for record in answer.additionals() {
                let ip = match &record.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                    _ => continue,
                };
                addresses.entry(record.name.clone()).or_default().push(ip);
            }
            // Targets without glue records are looked up themselves: at once,
            // all under one deadline, and one that fails is left out (and
            // said) rather than failing the whole set. At most
            // `max_backends` of them, the same ones on every replica.
            let mut unglued: Vec<&Name> =
                wanted.iter().map(|srv| &srv.target).filter(|t| !addresses.contains_key(*t)).collect();
            unglued.sort_by_key(|target| (xxh3_64(target.to_ascii().as_bytes()), target.to_ascii()));
            unglued.dedup();
            let cap = config.max_backends as usize;
            if unglued.len() > cap {
                dropped.over_max_backends += unglued.len() - cap;
                unglued.truncate(cap);
            }
            let deadline = tokio::time::Instant::now() + TARGETS_DEADLINE;
            let lookups = unglued.into_iter().cloned().map(|target: Name| {
                let lookup = tokio::time::timeout_at(deadline, resolver.lookup_ip(target.clone()));
                async move { (target, lookup.await) }
            });
            let resolved: Vec<_> =
                futures_util::stream::iter(lookups).buffer_unordered(TARGETS_AT_ONCE).collect().await;
            for (target, result) in resolved {
                match result {
                    Ok(Ok(ips)) => {
                        until = until.min(Instant::from_std(ips.valid_until()));
                        addresses.insert(target, ips.iter().collect());
                    }
                    Ok(Err(_)) | Err(_) => dropped.failed_targets.push(target.to_ascii()),
                }
            }
            dropped.failed_targets.sort();
            found = Vec::new();
            for srv in wanted {
                let Some(ips) = addresses.get(&srv.target) else { continue };
                // Weight 0 is "rarely" in RFC 2782: at least 1. Above the
                // config's own bound it is held to it.
                let weight = u32::from(srv.weight).clamp(1, Weight::MAX);
                found.extend(ips.iter().map(|ip| (SocketAddr::new(*ip, srv.port), weight)));
            }
            valid_until = until;
        }
    }
    found.retain(|(address, _)| {
        if unusable(*address, config.allow_link_local) {
            dropped.unusable_addresses += 1;
            false
        } else if is_own(*address, own) {
            dropped.own_addresses += 1;
            false
        } else {
            true
        }
    });
    found.sort_by_key(|(address, _)| *address);
    found.dedup_by_key(|(address, _)| *address);
    // A larger answer keeps the addresses that hash lowest: the same subset
    // on every replica, and one that changes little as the answer changes.
    let cap = config.max_backends as usize;
    if found.len() > cap {
        dropped.over_max_backends += found.len() - cap;
        found.sort_by_key(|(address, _)| (xxh3_64(address.to_string().as_bytes()), *address));
        found.truncate(cap);
        found.sort_by_key(|(address, _)| *address);
    }
    if found.is_empty() {
        return Err(if dropped.any() { format!("no usable records ({dropped:?})") } else { "no records".to_owned() });
    }
    let backends = found
        .into_iter()
        .map(|(address, weight)| BackendConfig {
            address: address.to_string(),
            weight,
            max_concurrency: config.defaults.max_concurrency,
        })
        .collect();
    Ok(Answer { backends, valid_until, dropped })
}

/// An address no backend can have: unspecified, multicast or broadcast, port
/// 0, or link-local (169.254.169.254 is the cloud's metadata service) unless
/// the discovery allows it.
fn unusable(address: SocketAddr, allow_link_local: bool) -> bool {
    let ip = address.ip().to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    address.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast || (link_local && !allow_link_local)
}

/// One of the proxy's own listening addresses (a listener bound to all
/// addresses is reachable on loopback too): a backend there would loop
/// requests back into the proxy.
fn is_own(address: SocketAddr, own: &[SocketAddr]) -> bool {
    let ip = address.ip().to_canonical();
    own.iter().any(|bind| {
        bind.port() == address.port() && (bind.ip() == ip || (bind.ip().is_unspecified() && ip.is_loopback()))
    })
}

/// A failed lookup in the words an operator looks for.
fn reason(error: &NetError) -> String {
    match error {
        NetError::Timeout => "timeout".to_owned(),
        NetError::Dns(DnsError::NoRecordsFound(none)) if none.response_code == ResponseCode::NXDomain => {
            "NXDOMAIN".to_owned()
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => "no records".to_owned(),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => "SERVFAIL".to_owned(),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => "REFUSED".to_owned(),
        other => other.to_string(),
    }
}

/// One discovered upstream in `/status`.
#[derive(Debug, Serialize)]
pub struct DiscoveryStatus {
    /// `dns NAME:PORT` or `srv NAME`.
    pub source: String,
    pub refresh_seconds: f64,
    /// Backends in the last good set (what the upstream serves).
    pub backends: usize,
    /// False while the last lookup failed: the last good set is kept.
    pub ok: bool,
    pub consecutive_failures: u32,
    pub last_success: Option<Moment>,
    /// The last failed lookup, kept after a success so that a flapping DNS shows.
    pub last_failure: Option<FailureStatus>,
    pub next_lookup_in_seconds: Option<f64>,
    /// What the last successful lookup's answer held that the set does not.
    pub dropped: Dropped,
}

/// A past moment: wall-clock time and how long ago.
#[derive(Debug, Serialize)]
pub struct Moment {
    /// `2026-11-28T03:16:36Z`.
    pub at: String,
    pub seconds_ago: f64,
}

#[derive(Debug, Serialize)]
pub struct FailureStatus {
    /// `timeout`, `SERVFAIL`, `NXDOMAIN`, `no records`, or the resolver's words.
    pub reason: String,
    #[serde(flatten)]
    pub when: Moment,
}

impl DiscoveryStatus {
    fn of(watch: &Watch, now: (Instant, SystemTime)) -> Self {
        let state = watch.found.state.lock().expect("never poisoned").clone();
        let moment = |(at, wall): (Instant, SystemTime)| Moment {
            at: crate::config::tls::date(wall),
            seconds_ago: now.0.saturating_duration_since(at).as_secs_f64(),
        };
        DiscoveryStatus {
            source: watch.config.source.to_string(),
            refresh_seconds: watch.config.refresh.as_secs_f64(),
            backends: state.backends.as_ref().map_or(0, Vec::len),
            ok: state.consecutive_failures == 0 && state.backends.is_some(),
            consecutive_failures: state.consecutive_failures,
            last_success: state.last_success.map(moment),
            last_failure: state.last_failure.map(|f| FailureStatus { reason: f.reason, when: moment(f.at) }),
            next_lookup_in_seconds: state.next_lookup.map(|at| at.saturating_duration_since(now.0).as_secs_f64()),
            dropped: state.dropped,
        }
    }
}
