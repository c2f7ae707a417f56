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
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as DnsServers};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

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
}

#[derive(Clone)]
struct Failure {
    reason: String,
    at: (Instant, SystemTime),
}

impl Discovery {
    /// `changed` is woken whenever an upstream's set changes.
    pub fn new(settings: &ResolverConfig, changed: Arc<Notify>) -> Self {
        Discovery { resolver: Resolver::build(settings), watches: HashMap::new(), changed }
    }

    /// Makes the lookup loops exactly those `config` asks for. A new or changed
    /// discovery is looked up once before this returns (within the resolver's
    /// bounds), so the snapshot compiled next already has its backends; one
    /// whose source is unchanged keeps the set it found. A changed `resolver:`
    /// restarts every loop.
    pub async fn sync(&mut self, config: &Config) {
        let resolver_changed = config.resolver != self.resolver.settings;
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
            let resolver = self.resolver.built.clone();
            async move { found.look(&resolver, name, config).await.0 }
        });
        let waits = join_all(first_lookups).await;
        for ((name, config, found), wait) in started.into_iter().zip(waits) {
            let task = tokio::spawn(follow(
                self.resolver.built.clone(),
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
    upstream: String,
    config: DiscoveryConfig,
    found: Arc<Found>,
    changed: Arc<Notify>,
    mut wait: Duration,
) {
    loop {
        tokio::time::sleep(wait).await;
        let changed_set;
        (wait, changed_set) = found.look(&resolver, &upstream, &config).await;
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
    ) -> (Duration, bool) {
        let result = match resolver {
            Ok(resolver) => lookup(resolver, config).await,
            Err(reason) => Err(reason.clone()),
        };
        crate::metrics::discovery_lookup(upstream, result.is_ok());
        let now = (Instant::now(), SystemTime::now());
        let mut state = self.state.lock().expect("never poisoned");
        let mut changed = false;
        let wait = match result {
            Ok((backends, valid_until)) => {
                if state.backends.as_ref() != Some(&backends) {
                    tracing::info!(upstream, source = %config.source, backends = backends.len(), "discovered backends changed");
                    changed = true;
                }
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

/// The backends `config` names now, sorted by address, and until when the
/// answer is valid. An empty answer is a failure: it would take every backend
/// away, which a DNS outage must not do.
async fn lookup(resolver: &TokioResolver, config: &DiscoveryConfig) -> Result<(Vec<BackendConfig>, Instant), String> {
    let defaults = config.defaults;
    let backend = |address: SocketAddr, weight: u32| BackendConfig {
        address: address.to_string(),
        weight,
        max_concurrency: defaults.max_concurrency,
    };
    let mut backends: Vec<BackendConfig>;
    let valid_until;
    match &config.source {
        DiscoverySource::Dns { name, port } => {
            let found = resolver.lookup_ip(name.as_str()).await.map_err(|e| reason(&e))?;
            valid_until = found.valid_until();
            backends = found.iter().map(|ip| backend(SocketAddr::new(ip, *port), defaults.weight)).collect();
        }
        DiscoverySource::Srv { name } => {
            let found = resolver.srv_lookup(name.as_str()).await.map_err(|e| reason(&e))?;
            let mut until = found.valid_until();
            let records: Vec<_> = found
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
            let mut addresses: HashMap<&Name, Vec<IpAddr>> = HashMap::new();
            for record in found.additionals() {
                let ip = match &record.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                    _ => continue,
                };
                addresses.entry(&record.name).or_default().push(ip);
            }
            backends = Vec::new();
            for srv in wanted {
                let ips = match addresses.get(&srv.target) {
                    Some(ips) => ips.clone(),
                    // Targets without glue records are looked up themselves.
                    None => {
                        let target = resolver.lookup_ip(srv.target.clone()).await.map_err(|e| reason(&e))?;
                        until = until.min(target.valid_until());
                        target.iter().collect()
                    }
                };
                // Weight 0 is "rarely" in RFC 2782; a backend's weight is at least 1.
                let weight = u32::from(srv.weight).max(1);
                backends.extend(ips.into_iter().map(|ip| backend(SocketAddr::new(ip, srv.port), weight)));
            }
            valid_until = until;
        }
    }
    backends.sort_by(|a, b| a.address.cmp(&b.address));
    backends.dedup_by(|a, b| a.address == b.address);
    if backends.is_empty() {
        return Err("no records".to_owned());
    }
    Ok((backends, valid_until))
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
        }
    }
}
